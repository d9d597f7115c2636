//! The namespace sandbox environment: a function's guest `init` runs as PID 1 of fresh
//! PID, mount, UTS, IPC and network namespaces, over a read-only root, with its memory
//! and process count limited by a cgroup. It needs no image build beyond a directory.
//!
//! The host side ([`SandboxLauncher`]) plans; the single-threaded
//! `kindling-sandbox-exec` helper forks and mounts ([`guest`]), because forking inside a
//! multi-threaded tokio process is unsafe.

pub mod cgroup;
pub mod guest;
mod launcher;
pub mod plan;

pub use launcher::{
    SandboxEnvironment, SandboxLauncher, SandboxOptions, ENV_EXEC, EXEC_NAME, HOST_ROOT_DIRS,
};
