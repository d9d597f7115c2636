//! Host side of Kindling: the Runtime API server that guests poll, the Invoke API that
//! callers use, and the scheduler that owns execution environments.
//!
//! The CLI builds a [`Server`] from [`config::load`]ed functions, a launcher per
//! [`Isolation`] and a [`Deployer`] for code uploaded through the control plane, and talks
//! to a running one with [`client`]. State that must outlive the process is in
//! [`store`] (`<state-dir>/kindling.db`).

mod body;
pub mod client;
pub mod config;
mod connections;
pub mod control_plane;
pub mod credentials;
pub mod environment;
mod event_stream;
mod events;
mod freezing;
mod function_url;
pub mod hops;
mod invoke_api;
pub mod logs;
pub mod metrics;
mod names;
pub mod runtime_server;
pub mod scheduler;
mod server;
pub mod store;
pub mod streaming;
mod vocabulary;

pub use control_plane::{DeployError, Deployer};
pub use credentials::HostCredentials;
pub use environment::{
    Credentials, Environment, EnvironmentSpec, Freezer, Function, Isolation, Launcher, StartPhases,
    StopMode,
};
pub use events::EventQueueOptions;
pub use function_url::{PayloadFormat, UrlConfig};
pub use invoke_api::{
    HEADER_CLIENT_CONTEXT, HEADER_EXECUTED_VERSION, HEADER_FUNCTION_ERROR, HEADER_INVOCATION_TYPE,
    HEADER_LOG_RESULT, HEADER_LOG_TYPE, MAX_EVENT_PAYLOAD_BYTES,
};
pub use server::{Server, ServerOptions, DEFAULT_INVOKE_ADDR};
