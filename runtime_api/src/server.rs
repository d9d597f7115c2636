//! [`Server`]: everything the `kindling serve` / `kindling run` commands start, as one
//! value: the Invoke API, the scheduler with its environments, logs and metrics.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};

use crate::connections::ConnectionLimits;
use crate::environment::{Function, Isolation, Launcher};
use crate::invoke_api::{self, InvokeApi};
use crate::logs::{self, LogLine, LogSink};
use crate::metrics::Metrics;
use crate::scheduler::{Scheduler, SchedulerOptions};

/// Where Lambda's local emulator listens, and so where callers look first.
pub const DEFAULT_INVOKE_ADDR: &str = "127.0.0.1:9000";

/// How a [`Server`] runs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The Invoke API's address; port 0 picks a free one (see [`Server::local_addr`]).
    pub invoke_addr: SocketAddr,
    /// Holds `envs/` (one directory per environment, removed when it stops) and
    /// `logs/<function>.log` (with `logs/<function>.log.1` once rotated). Unix socket
    /// paths are short: keep this short too.
    pub state_dir: PathBuf,
    /// A warm environment unused this long is stopped.
    pub idle_timeout: Duration,
    /// An idle environment is frozen once it has been idle this long; `None`: never.
    pub freeze_after: Option<Duration>,
    /// Callers that may wait per function once every environment is busy.
    pub queue_depth: usize,
    /// Accepted `Event` invocations per function not yet finished (queued or running);
    /// past it, or past `event_queue_bytes` of their payloads, an `Event` gets 429.
    pub event_queue_depth: usize,
    pub event_queue_bytes: usize,
    /// Environment start until its runtime's first `/next`.
    pub init_timeout: Duration,
    /// How long shutdown lets running invocations finish.
    pub shutdown_grace: Duration,
    /// A function's log file is rotated (to `<function>.log.1`, replacing the previous
    /// one) when a line would take it past this many bytes.
    pub log_file_max_bytes: u64,
    /// An Invoke API connection that has sent part of a request head is closed when the
    /// head is not complete this long after its first byte.
    pub header_read_timeout: Duration,
    /// An Invoke API connection with no request for this long (since it was accepted, or
    /// since its last answer was written) is closed.
    pub keep_alive_timeout: Duration,
    /// An Invoke request whose body has not all arrived this long after its head is
    /// answered 408 `RequestTimeoutException` and its connection closed.
    pub body_read_timeout: Duration,
    /// Invoke API connections served at once; one more is answered 503
    /// `ServiceException` (`Connection: close`) and closed.
    pub max_connections: usize,
}

impl ServerOptions {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let defaults = SchedulerOptions::new(PathBuf::new());
        Self {
            invoke_addr: DEFAULT_INVOKE_ADDR.parse().expect("a valid address"),
            state_dir: state_dir.into(),
            idle_timeout: defaults.idle_timeout,
            freeze_after: defaults.freeze_after,
            queue_depth: defaults.queue_depth,
            event_queue_depth: defaults.event_queue_depth,
            event_queue_bytes: defaults.event_queue_bytes,
            init_timeout: defaults.init_timeout,
            shutdown_grace: defaults.shutdown_grace,
            log_file_max_bytes: logs::DEFAULT_MAX_FILE_BYTES,
            header_read_timeout: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(120),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// A bound, not yet running, Kindling host.
pub struct Server {
    listener: TcpListener,
    scheduler: Arc<Scheduler>,
    metrics: Arc<Metrics>,
    logs: Arc<LogSink>,
    limits: ConnectionLimits,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("scheduler", &self.scheduler)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds the Invoke API and prepares the state directory. Every function's
    /// isolation needs a launcher in `launchers`.
    pub async fn bind(
        functions: Vec<Function>,
        launchers: HashMap<Isolation, Arc<dyn Launcher>>,
        options: ServerOptions,
    ) -> anyhow::Result<Self> {
        if functions.is_empty() {
            anyhow::bail!("no functions to serve");
        }
        let logs = Arc::new(
            LogSink::new(&options.state_dir.join("logs"))
                .with_context(|| {
                    format!(
                        "{}: cannot create the log directory",
                        options.state_dir.display()
                    )
                })?
                .with_max_file_bytes(options.log_file_max_bytes),
        );
        let metrics = Arc::new(Metrics::default());
        let mut sched = SchedulerOptions::new(options.state_dir.join("envs"));
        sched.idle_timeout = options.idle_timeout;
        sched.freeze_after = options.freeze_after;
        sched.queue_depth = options.queue_depth;
        sched.event_queue_depth = options.event_queue_depth;
        sched.event_queue_bytes = options.event_queue_bytes;
        sched.init_timeout = options.init_timeout;
        sched.shutdown_grace = options.shutdown_grace;
        let scheduler = Arc::new(Scheduler::new(
            functions,
            &launchers,
            sched,
            logs.clone(),
            metrics.clone(),
        )?);
        let listener = TcpListener::bind(options.invoke_addr)
            .await
            .with_context(|| format!("cannot listen on {}", options.invoke_addr))?;
        Ok(Self {
            listener,
            scheduler,
            metrics,
            logs,
            limits: ConnectionLimits {
                header_read_timeout: options.header_read_timeout,
                keep_alive_timeout: options.keep_alive_timeout,
                body_read_timeout: options.body_read_timeout,
                max_connections: options.max_connections,
            },
        })
    }

    /// The Invoke API's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Every function's log lines from now on (`START`, the runtime's lines, `END`, `REPORT`).
    pub fn logs(&self) -> broadcast::Receiver<LogLine> {
        self.logs.subscribe()
    }

    /// The log file a function's lines are appended to; the lines before its last
    /// rotation are in [`Server::rotated_log_path`].
    pub fn log_path(&self, function: &str) -> PathBuf {
        self.logs.path(function)
    }

    /// `<function>.log.1`: the function's log file before its last rotation.
    pub fn rotated_log_path(&self, function: &str) -> PathBuf {
        self.logs.rotated_path(function)
    }

    /// Serves until `shutdown` resolves, then refuses new work, lets running invocations
    /// finish (within the shutdown grace) and stops every environment.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let addr = self.local_addr();
        tracing::info!(%addr, "Invoke API listening");
        let (stop_tx, stop_rx) = watch::channel(false);
        let api = Arc::new(InvokeApi {
            scheduler: self.scheduler.clone(),
            metrics: self.metrics.clone(),
            limits: self.limits,
        });
        let serving = tokio::spawn(invoke_api::serve(self.listener, api, stop_rx));
        let scheduler = self.scheduler.clone();
        let reaper = tokio::spawn(async move { scheduler.retire_idle().await });
        shutdown.await;
        tracing::info!("shutting down");
        // Answers in progress are still written while environments drain.
        self.scheduler.shutdown().await;
        stop_tx.send_replace(true);
        serving.await.context("the Invoke API task failed")?;
        reaper.await.context("the idle reaper failed")?;
        remove_if_empty(self.scheduler.env_root());
        tracing::info!("stopped");
        Ok(())
    }
}

fn remove_if_empty(dir: &Path) {
    // Fails, as meant, when something is left in it.
    let _ = std::fs::remove_dir(dir);
}
