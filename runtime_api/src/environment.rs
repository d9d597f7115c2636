//! The seam between the scheduler and whatever isolates a function: a namespace sandbox
//! or a microVM. The scheduler only starts, watches and stops environments; each
//! environment's guest reaches the host's Runtime API server through the Unix socket at
//! [`EnvironmentSpec::runtime_api_socket`], which the scheduler binds *before* it starts
//! the environment.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::vocabulary::closed_vocabulary;

closed_vocabulary! {
    /// How a function is isolated.
    pub enum Isolation {
        Sandbox = "sandbox",
        MicroVm = "microvm",
    }
}

closed_vocabulary! {
    /// Whether a function's environments reach the network: outbound IPv4 and DNS, as on
    /// Lambda, or only their own loopback.
    pub enum Network {
        Outbound = "outbound",
        None = "none",
    }
}

closed_vocabulary! {
    /// Whether a function gets AWS credentials, as SAM passes them to a local function.
    pub enum Credentials {
        /// The server's own (its environment's, or its `~/.aws` profile's):
        /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.
        Host = "host",
        /// None: only what the function's own variables set.
        None = "none",
    }
}

/// A function as the scheduler knows it (one entry of `functions.toml`).
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    /// Directory of the function's code (an unpacked zip is a directory too).
    pub code: PathBuf,
    /// `provided`, `python`, `node`.
    pub runtime: String,
    pub handler: String,
    pub memory_mb: u32,
    pub timeout: Duration,
    pub isolation: Isolation,
    pub max_concurrency: usize,
    pub env: BTreeMap<String, String>,
    /// Lambda's SnapStart: a snapshot is taken once the runtime has initialised, and
    /// later cold starts restore it instead of booting (microVMs only).
    pub snapstart: bool,
    pub network: Network,
    /// Its layers (folders or `.zip`s), unpacked in order into `/opt`; once readied for
    /// the launchers, the one folder they were merged into.
    pub layers: Vec<PathBuf>,
    /// Whether it gets the host's AWS credentials; `None`: as the server decides.
    pub credentials: Option<Credentials>,
}

/// What one environment is started with.
#[derive(Debug, Clone)]
pub struct EnvironmentSpec {
    /// Unique id, used in logs and paths.
    pub id: String,
    /// A directory the environment owns for its sockets and scratch; removed on stop.
    pub dir: PathBuf,
    pub function: Function,
}

impl EnvironmentSpec {
    /// Host end of the guest's Runtime API connection: `<dir>/vsock.sock_9001`, the path
    /// Firecracker's hybrid vsock uses for guest connections to port 9001.
    pub fn runtime_api_socket(&self) -> PathBuf {
        self.vsock_uds()
            .with_file_name(format!("vsock.sock_{}", kindling_wire::RUNTIME_API_PORT))
    }

    /// The vsock device's base Unix socket path (`uds_path` in Firecracker's API).
    pub fn vsock_uds(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// The guest's console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

/// Why an environment is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Ask the guest to shut down cleanly; kill it after the grace period.
    Graceful(Duration),
    /// Kill at once (timeouts, broken environments).
    Kill,
}

/// One running execution environment.
#[async_trait]
pub trait Environment: Send + Sync {
    fn id(&self) -> &str;
    /// Whether the environment is still running; never blocks.
    fn is_alive(&mut self) -> bool;
    /// Resolves when the environment has stopped by itself (crash, guest power-off),
    /// with a one-line reason (`exit status 3`, `signal: killed`, ...), which callers
    /// see in `Runtime exited with error: <reason>`.
    ///
    /// Must be cancel-safe: the scheduler polls it in `select!` next to each invocation
    /// and drops the future when the invocation ends first.
    async fn exited(&mut self) -> String;
    /// Stops the environment and removes everything it created on the host. The
    /// scheduler then closes the Runtime API socket and removes `spec.dir`.
    async fn stop(&mut self, mode: StopMode) -> io::Result<()>;
    /// Where the guest's console output goes (kept on failure for `kindling logs`).
    fn console_log(&self) -> Option<&Path> {
        None
    }
    /// The phases of this environment's start that only it can see (hypervisor start,
    /// guest boot, ...), in order. Asked once, when its first invocation ends; they go
    /// into that invocation's `REPORT` line and into `/metrics`.
    fn start_phases(&self) -> StartPhases {
        Vec::new()
    }
    /// When its init started, on [`kindling_wire::monotonic_ns`], for an environment whose
    /// guest shares the host's clock (a sandbox); with the agent's own start stamp it
    /// gives init's share of the start (`Init Start`).
    fn init_started_ns(&self) -> Option<u64> {
        None
    }
    /// How to pause this environment while it waits for its next event, as Lambda
    /// freezes its environments; `None` when it cannot be paused. Asked once, after it
    /// started; the scheduler calls it from its own tasks, beside the other methods.
    fn freezer(&self) -> Option<Arc<dyn Freezer>> {
        None
    }
    /// SnapStart: the runtime has initialised and waits for its first event. An
    /// environment that is to take its function's snapshot takes it now (it pauses, saves
    /// and resumes its guest, whose connections to the host start afresh) and returns how
    /// long that took; any other does nothing. Called once, only for SnapStart functions.
    async fn snapshot(&mut self) -> anyhow::Result<Option<Duration>> {
        Ok(None)
    }
    /// When this environment's guest started running again, if it was restored from a
    /// snapshot rather than booted: what a restored cold start reports instead of its init.
    fn restored_at(&self) -> Option<std::time::Instant> {
        None
    }
    /// The guest's own side of its network link, which a SnapStart guest is told on its
    /// first event (a clone resumes configured with the lease of the guest that took the
    /// snapshot; to that guest itself it changes nothing); `None` without a network.
    fn guest_network(&self) -> Option<kindling_wire::GuestNetwork> {
        None
    }
    /// The most memory the whole environment has used since it started, in MiB, as the
    /// host can measure it (`None` where it cannot see inside): what the `REPORT` of an
    /// invocation that failed without the guest's own measure says (a timeout, a guest
    /// that died). Asked before the environment is stopped.
    fn memory_peak_mb(&self) -> Option<u64> {
        None
    }
}

/// Pauses and resumes one environment: while frozen no guest code runs (a handler's
/// background work makes no progress), yet the environment stays killable. The scheduler
/// never calls [`Freezer::freeze`] and [`Freezer::thaw`] at once, and thaws an environment
/// before it stops it (a frozen guest cannot shut down cleanly).
#[async_trait]
pub trait Freezer: Send + Sync {
    /// Stops the guest; it may finish stopping after this returns.
    async fn freeze(&self) -> io::Result<()>;
    /// Lets the guest run again; on the invoke path, so it must be cheap.
    async fn thaw(&self) -> io::Result<()>;
}

/// Named durations of an environment's start, e.g. `("Guest Boot", 729 ms)`.
pub type StartPhases = Vec<(&'static str, Duration)>;

/// Starts environments of one kind (sandbox, microVM with a given hypervisor).
#[async_trait]
pub trait Launcher: Send + Sync {
    /// A short name for logs: `sandbox`, `microvm/qemu`, ...
    fn name(&self) -> &str;
    async fn start(&self, spec: &EnvironmentSpec) -> anyhow::Result<Box<dyn Environment>>;
    /// Removes what environment `id` of a server that died without stopping it (SIGKILL)
    /// left outside its folder, such as a sandbox's cgroup; called once for each such
    /// environment when a server starts on the same state dir.
    fn remove_orphan(&self, _id: &str) {}
}
