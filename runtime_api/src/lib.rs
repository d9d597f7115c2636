//! Host side of Kindling: the Runtime API server that guests poll, the Invoke API that
//! callers use, and the scheduler that owns execution environments.
//!
//! The CLI builds a [`Server`] from [`config::load`]ed functions and a launcher per
//! [`Isolation`], and talks to a running one with [`client`].

mod body;
pub mod client;
pub mod config;
mod connections;
pub mod environment;
mod freezing;
mod invoke_api;
pub mod logs;
pub mod metrics;
mod names;
pub mod runtime_server;
pub mod scheduler;
mod server;
mod vocabulary;

pub use environment::{
    Environment, EnvironmentSpec, Freezer, Function, Isolation, Launcher, StartPhases, StopMode,
};
pub use invoke_api::{
    HEADER_CLIENT_CONTEXT, HEADER_EXECUTED_VERSION, HEADER_FUNCTION_ERROR, HEADER_INVOCATION_TYPE,
    HEADER_LOG_RESULT, HEADER_LOG_TYPE, MAX_EVENT_PAYLOAD_BYTES,
};
pub use server::{Server, ServerOptions, DEFAULT_INVOKE_ADDR};
