//! The bootstrap's own configuration, read once from its environment (set by init, or by
//! tests that point the well-known guest paths at temporary directories).

use std::env;
use std::net::SocketAddr;
use std::path::PathBuf;

use kindling_wire::{HostAddr, RuntimeUser, ENV_HOST_ADDR, ENV_RUNTIME_USER};

/// Where the public Runtime API is served inside the guest; `127.0.0.1:0` picks a free port.
pub const ENV_LISTEN: &str = "KINDLING_LISTEN";
/// Overrides of the guest paths where a runtime may live (tests use temp dirs).
pub const ENV_TASK_ROOT: &str = "KINDLING_TASK_ROOT";
pub const ENV_OPT_ROOT: &str = "KINDLING_OPT_ROOT";
pub const ENV_RUNTIME_DIR: &str = "KINDLING_RUNTIME_DIR";

#[derive(Debug, Clone)]
pub struct Config {
    /// The host's Runtime API.
    pub host: HostAddr,
    /// The local Runtime API address the runtime is told about.
    pub listen: SocketAddr,
    /// `/var/task`: the function's code and the runtime's working directory.
    pub task_root: PathBuf,
    /// `/opt`: layers.
    pub opt_root: PathBuf,
    /// `/var/runtime`: the shipped runtime shims.
    pub runtime_dir: PathBuf,
    /// Whom the runtime runs as, without capabilities (set by init: Lambda's uid 993 by
    /// default); `None` (the agent run directly, as its tests do): as the agent.
    pub runtime_user: Option<RuntimeUser>,
}

impl Config {
    /// Reads the configuration; a malformed value is an error naming the variable.
    pub fn from_env() -> Result<Self, String> {
        let host = match env::var(ENV_HOST_ADDR) {
            Ok(v) => v.parse().map_err(|e| format!("{ENV_HOST_ADDR}: {e}"))?,
            Err(env::VarError::NotPresent) => HostAddr::default(),
            Err(e) => return Err(format!("{ENV_HOST_ADDR}: {e}")),
        };
        let listen = env::var(ENV_LISTEN)
            .unwrap_or_else(|_| "127.0.0.1:9001".into())
            .parse()
            .map_err(|e| format!("{ENV_LISTEN}: expected IP:PORT: {e}"))?;
        let path = |var: &str, default: &str| {
            env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from)
        };
        let runtime_user = match env::var(ENV_RUNTIME_USER) {
            Ok(v) => Some(v.parse().map_err(|e| format!("{ENV_RUNTIME_USER}: {e}"))?),
            Err(env::VarError::NotPresent) => None,
            Err(e) => return Err(format!("{ENV_RUNTIME_USER}: {e}")),
        };
        Ok(Config {
            host,
            listen,
            runtime_user,
            task_root: path(ENV_TASK_ROOT, "/var/task"),
            opt_root: path(ENV_OPT_ROOT, "/opt"),
            runtime_dir: path(ENV_RUNTIME_DIR, "/var/runtime"),
        })
    }
}
