//! The scheduler: which environment runs an invocation.
//!
//! Per function it keeps warm environments for reuse, starts new ones on demand up to
//! `max_concurrency`, queues callers beyond that (a bounded queue, so that overload is
//! answered with 429 instead of unbounded memory), freezes idle environments until their
//! next invocation (`freezing.rs`), retires environments that sat idle,
//! and throws away any environment that timed out, crashed or failed its init, so that
//! the next invocation gets a fresh one.
//!
//! The set of functions changes while it runs (the control plane): a function replaced
//! ([`Scheduler::deploy`]) or removed ([`Scheduler::remove`]) drains its old pool, so that
//! invocations already in it finish on the old code while new ones go to the new pool, and
//! its warm environments are stopped.
//!
//! Each published version of a function has a pool of its own, apart from `$LATEST`'s: an
//! environment only ever runs the one version's code and configuration it started with.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use kindling_wire::{monotonic_ns, ErrorBody, FunctionEnvironment, InvocationReport};
use tokio::sync::{oneshot, watch, Notify};

use crate::credentials::HostCredentials;
use crate::environment::{
    Credentials, Environment, EnvironmentSpec, Function, Isolation, Launcher, StopMode,
};
use crate::freezing::Freezing;
use crate::hops::Stamps;
use crate::logs::{self, LogSink, Restore, Status};
use crate::metrics::Metrics;
use crate::runtime_server::{Completion, Invocation, Outcome, RuntimeApi};
use crate::streaming::StreamSink;

/// The version an unqualified invocation runs.
pub const VERSION: &str = crate::store::LATEST;
/// The account id in ARNs unless the server is given another.
pub const DEFAULT_ACCOUNT_ID: &str = "000000000000";
/// Longest Unix socket path Linux takes (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long an environment idles before it is frozen, by default.
pub const DEFAULT_FREEZE_AFTER: Duration = Duration::from_millis(100);

/// Knobs of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Where environment directories go (`<state>/envs`).
    pub env_root: PathBuf,
    /// A warm environment unused this long is stopped.
    pub idle_timeout: Duration,
    /// An idle environment whose runtime waits for its next event is frozen (paused, as
    /// Lambda freezes them) once it has been idle this long; `None`: never. A moment
    /// rather than at once, so that back-to-back invocations never wait for a thaw.
    pub freeze_after: Option<Duration>,
    /// Callers that may wait per function once every environment is busy.
    pub queue_depth: usize,
    /// Start of an environment until its runtime's first `/next` (Lambda: 10 s).
    pub init_timeout: Duration,
    /// Grace given to an environment asked to stop cleanly: Lambda's 2 s for extensions
    /// to act on `SHUTDOWN`, and a moment to forward their last lines.
    pub stop_grace: Duration,
    /// How long shutdown lets running invocations finish before it cancels them.
    pub shutdown_grace: Duration,
    /// The region of ARNs and of the functions' `AWS_REGION`.
    pub region: String,
    /// The account of ARNs.
    pub account_id: String,
    /// Whether functions that do not say get the host's credentials.
    pub default_credentials: Credentials,
    /// The host's credentials, for functions that get them; `None`: none were found, and
    /// such a function's environments fail to start, saying so.
    pub host_credentials: Option<Arc<HostCredentials>>,
}

impl SchedulerOptions {
    pub fn new(env_root: PathBuf) -> Self {
        Self {
            env_root,
            idle_timeout: Duration::from_secs(300),
            freeze_after: Some(DEFAULT_FREEZE_AFTER),
            queue_depth: 100,
            init_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(3),
            shutdown_grace: Duration::from_secs(5),
            region: "us-east-1".into(),
            account_id: DEFAULT_ACCOUNT_ID.into(),
            default_credentials: Credentials::None,
            host_credentials: None,
        }
    }
}

/// One invocation as a caller asked for it.
#[derive(Debug, Clone, Default)]
pub struct InvokeRequest {
    pub payload: Bytes,
    /// Decoded client context JSON (`Lambda-Runtime-Client-Context`).
    pub client_context: Option<String>,
    pub cognito_identity: Option<String>,
    /// `X-Amzn-Trace-Id` of the caller; one is made up when absent.
    pub trace_id: Option<String>,
    /// The request id the function sees; a new one when absent (an `Event` keeps its
    /// own through every attempt).
    pub request_id: Option<String>,
    /// The qualifier the caller named (an alias, or a version), for the ARN the function
    /// sees as its invoked ARN; the version's own when absent.
    pub qualifier: Option<String>,
}

/// What the caller gets back.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The function's response payload (empty when it was streamed to the sink of
    /// [`Scheduler::invoke_streaming`]).
    Response(Bytes),
    /// A failed invocation: the error JSON the caller gets and the recorded type
    /// (`Runtime.Unknown`, `Runtime.ExitError`, `Sandbox.Timedout`, ...).
    Error { error_type: String, body: Bytes },
}

/// A finished invocation.
#[derive(Debug, Clone)]
pub struct Invoked {
    pub request_id: String,
    pub answer: Answer,
    /// This invocation's log, `START` to `REPORT`; of a long one only `START` and the
    /// end (enough for [`logs::tail`]): the whole log is in the function's log file.
    pub log: String,
    /// The server's shutdown ended it before the function did.
    pub cut_short: bool,
    /// Where its time went, when the guest answered it (see [`crate::hops`]).
    pub stamps: Option<Stamps>,
}

/// Why an invocation could not be run at all. Show it with its sources (e.g. anyhow's
/// `{:#}`): an environment that failed to start names the cause there.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("Function not found: {0}")]
    NotFound(String),
    #[error("Rate Exceeded: every environment of {0} is busy and its queue is full")]
    TooManyRequests(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("cannot start an environment for {function}")]
    Environment {
        function: String,
        /// What the launcher (or the environment's directory or socket) failed with.
        #[source]
        source: anyhow::Error,
    },
}

/// A pool's key: the function's name and version.
type PoolKey = (String, String);

/// All functions' pools.
pub struct Scheduler {
    pools: RwLock<HashMap<PoolKey, Arc<Pool>>>,
    /// Pools replaced or removed whose invocations have not all ended yet: shutdown and
    /// the idle reaper still tend them.
    draining: Mutex<Vec<Arc<Pool>>>,
    launchers: HashMap<Isolation, Arc<dyn Launcher>>,
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for Scheduler {
    /// The functions it serves and the options.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut functions: Vec<String> = self
            .read_pools()
            .keys()
            .map(|(name, version)| format!("{name}:{version}"))
            .collect();
        functions.sort();
        f.debug_struct("Scheduler")
            .field("functions", &functions)
            .field("options", &self.ctx.options)
            .finish_non_exhaustive()
    }
}

struct Ctx {
    options: SchedulerOptions,
    logs: Arc<LogSink>,
    metrics: Arc<Metrics>,
    next_env: AtomicU64,
    /// Set at shutdown: invocations still running give up.
    cancel: watch::Sender<bool>,
}

struct Pool {
    function: Function,
    /// `$LATEST` or a published version's number.
    version: String,
    /// The ARN the runtime sees: qualified for a published version.
    arn: String,
    launcher: Arc<dyn Launcher>,
    ctx: Arc<Ctx>,
    state: Mutex<PoolState>,
    /// Signalled whenever `live` drops, for shutdown.
    drained: Notify,
}

#[derive(Default)]
struct PoolState {
    /// Warm environments, most recently used last.
    idle: Vec<(Box<Env>, Instant)>,
    /// Environments starting, running or idle: never above `max_concurrency`.
    live: usize,
    /// Callers waiting for an environment, first come first served.
    queue: VecDeque<oneshot::Sender<Grant>>,
    closed: bool,
    /// Replaced or removed: environments still serve the callers queued here, then stop
    /// instead of going back to the warm set.
    draining: bool,
}

/// What a queued caller is handed: a warm environment, or the right to start one.
enum Grant {
    Warm(Box<Env>),
    Start,
}

struct Env {
    spec: EnvironmentSpec,
    handle: Box<dyn Environment>,
    api: RuntimeApi,
    /// Invocations this environment has run; 0 means its next one is a cold start.
    served: u64,
    /// Timed out, crashed or failed its init: it must be stopped, not reused.
    broken: bool,
    started: Instant,
    /// `None` when the environment cannot be frozen, or freezing is off.
    freezing: Option<Arc<Freezing>>,
    /// How long taking its function's snapshot took (SnapStart), reported with its cold
    /// start.
    snapshot_took: Option<Duration>,
}

impl Scheduler {
    /// Builds the pools, one per function and version; every function's isolation must
    /// have a launcher.
    pub fn new(
        functions: Vec<(Function, String)>,
        launchers: &HashMap<Isolation, Arc<dyn Launcher>>,
        options: SchedulerOptions,
        logs: Arc<LogSink>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&options.env_root)
            .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", options.env_root.display()))?;
        remove_orphaned_envs(&options.env_root, launchers.values());
        let ctx = Arc::new(Ctx {
            options,
            logs,
            metrics,
            next_env: AtomicU64::new(1),
            cancel: watch::Sender::new(false),
        });
        let scheduler = Self {
            pools: RwLock::default(),
            draining: Mutex::default(),
            launchers: launchers.clone(),
            ctx,
        };
        for (function, version) in functions {
            let key = (function.name.clone(), version.clone());
            let pool = scheduler.new_pool(function, version)?;
            if scheduler.write_pools().insert(key, pool).is_some() {
                anyhow::bail!("function names must be unique");
            }
        }
        Ok(scheduler)
    }

    fn new_pool(&self, function: Function, version: String) -> anyhow::Result<Arc<Pool>> {
        let launcher = self
            .launcher(function.isolation)
            .map_err(|e| anyhow::anyhow!("function {}: {e}", function.name))?;
        let mut arn = self.ctx.arn(&function.name);
        if version != VERSION {
            arn = format!("{arn}:{version}");
        }
        Ok(Arc::new(Pool {
            function,
            version,
            arn,
            launcher,
            ctx: self.ctx.clone(),
            state: Mutex::default(),
            drained: Notify::new(),
        }))
    }

    /// The launcher of an isolation, or why there is none.
    fn launcher(&self, isolation: Isolation) -> anyhow::Result<Arc<dyn Launcher>> {
        self.launchers
            .get(&isolation)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no launcher for isolation {isolation:?}"))
    }

    fn read_pools(&self) -> std::sync::RwLockReadGuard<'_, HashMap<PoolKey, Arc<Pool>>> {
        self.pools.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_pools(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<PoolKey, Arc<Pool>>> {
        self.pools.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `function` as `version` from now on: a new one is added; one of the same
    /// name and version is replaced, its old pool drained (invocations in it finish on
    /// the old code).
    pub async fn deploy(&self, function: Function, version: &str) -> anyhow::Result<()> {
        let key = (function.name.clone(), version.to_string());
        let pool = self.new_pool(function, version.to_string())?;
        let old = self.write_pools().insert(key, pool);
        if let Some(old) = old {
            self.drain(old).await;
        }
        Ok(())
    }

    /// Stops serving `name`, every version of it; invocations already running finish,
    /// warm environments stop.
    pub async fn remove(&self, name: &str) {
        let old: Vec<Arc<Pool>> = {
            let mut pools = self.write_pools();
            let keys: Vec<PoolKey> = pools.keys().filter(|(n, _)| n == name).cloned().collect();
            keys.iter().filter_map(|k| pools.remove(k)).collect()
        };
        for pool in old {
            self.drain(pool).await;
        }
    }

    /// Stops serving one published version of `name`, as [`Scheduler::remove`].
    pub async fn remove_version(&self, name: &str, version: &str) {
        let old = self
            .write_pools()
            .remove(&(name.to_string(), version.to_string()));
        if let Some(old) = old {
            self.drain(old).await;
        }
    }

    /// Lets `pool` serve what it holds, then stop; its idle environments stop now.
    async fn drain(&self, pool: Arc<Pool>) {
        let idle = {
            let mut st = pool.lock();
            st.draining = true;
            std::mem::take(&mut st.idle)
        };
        tracing::info!(function = %pool.function.name, idle = idle.len(), "draining the function's old environments");
        pool.discard_idle(idle.into_iter().map(|(env, _)| env))
            .await;
        let mut draining = self.draining.lock().unwrap_or_else(|e| e.into_inner());
        draining.retain(|p| p.lock().live > 0);
        if pool.lock().live > 0 {
            draining.push(pool);
        }
    }

    /// Every pool: those serving and those draining.
    fn all_pools(&self) -> Vec<Arc<Pool>> {
        let mut pools: Vec<Arc<Pool>> = self.read_pools().values().cloned().collect();
        pools.extend(
            self.draining
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
        pools
    }

    /// The function a name and version designate, as the scheduler runs it (`None`
    /// when it is not served). `function` at `$LATEST` is also the emulator's alias
    /// for the one function loaded, when exactly one is.
    pub fn resolve(&self, name: &str, version: &str) -> Option<Function> {
        self.pool(name, version).map(|p| p.function.clone())
    }

    fn pool(&self, name: &str, version: &str) -> Option<Arc<Pool>> {
        let pools = self.read_pools();
        let key = (name.to_string(), version.to_string());
        pools
            .get(&key)
            .or_else(|| {
                let mut latest = pools.values().filter(|p| p.version == VERSION);
                match (name, version, latest.clone().count()) {
                    ("function", VERSION, 1) => latest.next(),
                    _ => None,
                }
            })
            .cloned()
    }

    /// The ARN of a function name, as the runtime sees it.
    pub fn arn(&self, name: &str) -> String {
        self.ctx.arn(name)
    }

    /// The region of every function's ARN.
    pub fn region(&self) -> &str {
        &self.ctx.options.region
    }

    /// Where environment directories go.
    pub fn env_root(&self) -> &std::path::Path {
        &self.ctx.options.env_root
    }

    /// Runs one invocation to its end. `queued` invocations (`Event`, bounded by the
    /// durable event queue) wait for an environment however long the queue;
    /// others get [`InvokeError::TooManyRequests`] when the queue is full. The invocation runs on its own task: a caller that goes
    /// away loses its answer but never an environment.
    pub async fn invoke(
        &self,
        name: &str,
        version: &str,
        request: InvokeRequest,
        queued: bool,
    ) -> Result<Invoked, InvokeError> {
        self.invoke_into(name, version, request, queued, None).await
    }

    /// Runs one synchronous invocation whose streamed response (if the function streams)
    /// goes to `sink` as it arrives; the [`Invoked`] then holds an empty payload (see
    /// [`crate::streaming`]). A function that does not stream answers as usual.
    pub async fn invoke_streaming(
        &self,
        name: &str,
        version: &str,
        request: InvokeRequest,
        sink: StreamSink,
    ) -> Result<Invoked, InvokeError> {
        self.invoke_into(name, version, request, false, Some(sink))
            .await
    }

    async fn invoke_into(
        &self,
        name: &str,
        version: &str,
        request: InvokeRequest,
        queued: bool,
        sink: Option<StreamSink>,
    ) -> Result<Invoked, InvokeError> {
        let pool = self
            .pool(name, version)
            .ok_or_else(|| InvokeError::NotFound(name.to_string()))?;
        tokio::spawn(async move { pool.invoke(request, queued, sink).await })
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "invocation task failed");
                Err(InvokeError::ShuttingDown)
            })
    }

    /// Stops idle environments older than the idle timeout, and dead idle ones; runs
    /// until the scheduler shuts down.
    pub async fn retire_idle(&self) {
        let every = (self.ctx.options.idle_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut cancel = self.ctx.cancel.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = until_true(&mut cancel) => return,
            }
            for pool in self.all_pools() {
                pool.retire_idle().await;
            }
            self.draining
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|p| p.lock().live > 0);
        }
    }

    /// Refuses new invocations, lets running ones finish for the shutdown grace, then
    /// cancels the rest, and stops every environment.
    pub async fn shutdown(&self) {
        let pools = self.all_pools();
        futures_util::future::join_all(pools.iter().map(|pool| {
            let idle = {
                let mut st = pool.lock();
                st.closed = true;
                st.queue.clear();
                std::mem::take(&mut st.idle)
            };
            pool.discard_idle(idle.into_iter().map(|(env, _)| env))
        }))
        .await;
        let all_drained = async {
            for pool in &pools {
                pool.wait_drained().await;
            }
        };
        if tokio::time::timeout(self.ctx.options.shutdown_grace, all_drained)
            .await
            .is_err()
        {
            tracing::warn!("invocations still running at shutdown: cancelling them");
            self.ctx.cancel.send_replace(true);
            for pool in &pools {
                pool.wait_drained().await;
            }
        }
        self.ctx.cancel.send_replace(true);
    }
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn invoke(
        self: Arc<Self>,
        request: InvokeRequest,
        queued: bool,
        sink: Option<StreamSink>,
    ) -> Result<Invoked, InvokeError> {
        let name = &self.function.name;
        let grant = self.acquire(queued).await?;
        let warm = match grant {
            Grant::Warm(env) => self.thawed(env).await,
            Grant::Start => None,
        };
        let mut env = match warm {
            Some(env) => env,
            None => match self.start_env().await {
                Ok(env) => env,
                Err(source) => {
                    let reason = format!("{source:#}");
                    tracing::warn!(function = %name, %reason, "environment start failed");
                    self.release(None).await;
                    return Err(InvokeError::Environment {
                        function: name.clone(),
                        source,
                    });
                }
            },
        };
        let invoked = self.run(&mut env, request, sink).await;
        self.release(Some(env)).await;
        Ok(invoked)
    }

    /// A warm environment taken for an invocation, thawed if it was frozen; `None` (and
    /// the environment stopped, its slot kept for a fresh one) if it could not be thawed.
    async fn thawed(&self, env: Box<Env>) -> Option<Box<Env>> {
        let Some(freezing) = &env.freezing else {
            return Some(env);
        };
        match freezing.take().await {
            Ok(None) => Some(env),
            Ok(Some(took)) => {
                self.ctx.metrics.thaw_took(&self.function.name, took);
                tracing::debug!(env = %env.spec.id, ?took, "environment thawed");
                Some(env)
            }
            Err(e) => {
                tracing::warn!(env = %env.spec.id, error = %e, "cannot thaw an environment: starting a fresh one");
                self.stop(env, StopMode::Kill).await;
                None
            }
        }
    }

    /// A warm environment, the right to start one, or a place in the queue.
    async fn acquire(&self, queued: bool) -> Result<Grant, InvokeError> {
        enum Next {
            Go(Grant),
            Wait(oneshot::Receiver<Grant>),
            Full,
        }
        let mut dead = Vec::new();
        let next = {
            let mut st = self.lock();
            if st.closed {
                return Err(InvokeError::ShuttingDown);
            }
            let mut warm = None;
            while let Some((mut env, _)) = st.idle.pop() {
                if env.handle.is_alive() {
                    warm = Some(env);
                    break;
                }
                st.live -= 1;
                dead.push(env);
            }
            if let Some(env) = warm {
                Next::Go(Grant::Warm(env))
            } else if st.live < self.function.max_concurrency {
                st.live += 1;
                Next::Go(Grant::Start)
            } else if queued || st.queue.len() < self.ctx.options.queue_depth {
                let (tx, rx) = oneshot::channel();
                st.queue.push_back(tx);
                Next::Wait(rx)
            } else {
                Next::Full
            }
        };
        for env in dead {
            tracing::info!(env = %env.spec.id, "idle environment died");
            self.stop(env, StopMode::Kill).await;
        }
        match next {
            Next::Go(grant) => Ok(grant),
            Next::Wait(rx) => rx.await.map_err(|_| InvokeError::ShuttingDown),
            Next::Full => {
                tracing::debug!(function = %self.function.name, "queue full");
                Err(InvokeError::TooManyRequests(self.function.name.clone()))
            }
        }
    }

    /// Gives an environment back after an invocation (`None`: its slot is free): to the
    /// first queued caller, to the warm set, or, when it is broken or the pool is
    /// closing or draining, to the bin.
    async fn release(&self, env: Option<Box<Env>>) {
        let mut env = match env {
            Some(broken) if broken.broken => {
                self.stop(broken, StopMode::Kill).await;
                None
            }
            other => other,
        };
        let closing = {
            let mut st = self.lock();
            if !st.closed {
                while let Some(waiter) = st.queue.pop_front() {
                    match waiter.send(env.take().map_or(Grant::Start, Grant::Warm)) {
                        Ok(()) => return,
                        Err(Grant::Warm(e)) => env = Some(e),
                        Err(Grant::Start) => {}
                    }
                }
                if !st.draining {
                    if let Some(e) = env.take() {
                        self.freeze_when_idle(&e);
                        st.idle.push((e, Instant::now()));
                        return;
                    }
                }
            }
            env.take()
        };
        match closing {
            Some(e) => {
                self.discard(e, StopMode::Graceful(self.ctx.options.stop_grace))
                    .await
            }
            None => {
                self.lock().live -= 1;
                self.drained.notify_waiters();
            }
        }
    }

    /// Plans the freeze of an environment going back to the warm set.
    fn freeze_when_idle(&self, env: &Env) {
        if let (Some(freezing), Some(after)) = (&env.freezing, self.ctx.options.freeze_after) {
            freezing.freeze_later(after, env.api.parked(), self.ctx.metrics.clone());
        }
    }

    /// Stops idle environments gracefully, all at once: each may take the whole stop
    /// grace, and a shutdown or a drain must not take that many times over.
    async fn discard_idle(&self, envs: impl IntoIterator<Item = Box<Env>>) {
        let mode = StopMode::Graceful(self.ctx.options.stop_grace);
        futures_util::future::join_all(envs.into_iter().map(|env| self.discard(env, mode))).await;
    }

    /// Stops an environment and frees its slot.
    async fn discard(&self, env: Box<Env>, mode: StopMode) {
        self.stop(env, mode).await;
        self.lock().live -= 1;
        self.drained.notify_waiters();
    }

    async fn stop(&self, mut env: Box<Env>, mode: StopMode) {
        let id = env.spec.id.clone();
        // Frozen, a guest could not shut down, nor a sandbox's helper reap its init.
        if let Some(freezing) = &env.freezing {
            if let Err(e) = freezing.take().await {
                tracing::debug!(env = %id, error = %e, "cannot thaw an environment being stopped");
            }
        }
        if let Err(e) = env.handle.stop(mode).await {
            tracing::warn!(env = %id, error = %e, "environment did not stop cleanly");
        }
        let dir = env.spec.dir.clone();
        drop(env); // closes the Runtime API server before its socket goes
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(env = %id, error = %e, "cannot remove the environment directory");
            }
        }
        tracing::info!(env = %id, ?mode, "environment stopped");
    }

    async fn wait_drained(&self) {
        loop {
            let drained = self.drained.notified();
            if self.lock().live == 0 {
                return;
            }
            drained.await;
        }
    }

    async fn retire_idle(&self) {
        let timeout = self.ctx.options.idle_timeout;
        let retired: Vec<Box<Env>> = {
            let mut st = self.lock();
            let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut st.idle)
                .into_iter()
                .partition(|(_, since)| since.elapsed() >= timeout);
            st.idle = keep;
            old.into_iter().map(|(env, _)| env).collect()
        };
        for env in &retired {
            tracing::info!(env = %env.spec.id, "retiring idle environment");
        }
        self.discard_idle(retired).await;
    }

    async fn start_env(&self) -> anyhow::Result<Box<Env>> {
        let f = &self.function;
        let n = self.ctx.next_env.fetch_add(1, Ordering::Relaxed);
        // The pid keeps ids apart from the leftovers of an earlier server in the same state dir.
        let id = format!("{}-{}-{n}", f.name, std::process::id());
        let spec = EnvironmentSpec {
            id: id.clone(),
            dir: self.ctx.options.env_root.join(&id),
            function: f.clone(),
        };
        let socket = spec.runtime_api_socket();
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            anyhow::bail!(
                "{}: the socket path is longer than {MAX_SOCKET_PATH} bytes; choose a shorter state directory",
                socket.display()
            );
        }
        let mut variables = f.env.clone();
        if f.credentials
            .unwrap_or(self.ctx.options.default_credentials)
            == Credentials::Host
        {
            let credentials = self
                .ctx
                .options
                .host_credentials
                .as_ref()
                .with_context(|| {
                    format!(
                        "function {} gets the host's AWS credentials, and the server found none \
                     (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give --profile)",
                        f.name
                    )
                })?;
            credentials.apply(&mut variables);
        }
        std::fs::create_dir_all(&spec.dir).with_context(|| spec.dir.display().to_string())?;
        let mut environment = FunctionEnvironment {
            function_name: f.name.clone(),
            function_version: self.version.clone(),
            memory_mb: f.memory_mb,
            timeout_ms: u64::try_from(f.timeout.as_millis()).unwrap_or(u64::MAX),
            runtime: f.runtime.clone(),
            handler: f.handler.clone(),
            region: self.ctx.options.region.clone(),
            account_id: self.ctx.options.account_id.clone(),
            log_group_name: String::new(),
            log_stream_name: String::new(),
            initialization_type: "on-demand".into(),
            variables,
        };
        if f.snapstart {
            // What the guest learns at init lives on in every clone: nothing of this one
            // environment (Lambda gives SnapStart runtimes no log group or stream either).
            environment.initialization_type = kindling_wire::INITIALIZATION_SNAP_START.into();
        } else {
            environment.log_group_name = format!("/aws/lambda/{}", f.name);
            environment.log_stream_name = format!("{}/[{}]{}", today(), self.version, id);
        }
        let started = Instant::now();
        let result = async {
            let api = RuntimeApi::bind(&socket, environment, self.ctx.logs.clone())
                .with_context(|| socket.display().to_string())?;
            let handle = self.launcher.start(&spec).await?;
            Ok::<_, anyhow::Error>((api, handle))
        }
        .await;
        match result {
            Ok((api, handle)) => {
                tracing::info!(env = %id, launcher = self.launcher.name(), "environment started");
                let freezing = self
                    .ctx
                    .options
                    .freeze_after
                    .and(handle.freezer())
                    .map(|freezer| Freezing::new(freezer, &id, &f.name));
                Ok(Box::new(Env {
                    spec,
                    handle,
                    api,
                    served: 0,
                    broken: false,
                    started,
                    freezing,
                    snapshot_took: None,
                }))
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&spec.dir);
                Err(e)
            }
        }
    }

    /// SnapStart: once the runtime of a fresh environment has initialised (its first
    /// `/next` waits on the host) and before its first event, lets the environment take
    /// the function's snapshot. Gives up quietly when the runtime dies, fails its init or
    /// outlasts the init deadline first: the invocation then fails as it would have.
    async fn snapshot_when_initialised(&self, env: &mut Env, deadline: tokio::time::Instant) {
        let initialised = tokio::select! {
            ready = env.api.initialised() => ready,
            _ = env.handle.exited() => false,
            _ = tokio::time::sleep_until(deadline) => false,
        };
        if !initialised {
            return;
        }
        match env.handle.snapshot().await {
            Ok(took) => {
                if took.is_some() {
                    env.api.connections_reset();
                }
                env.snapshot_took = took;
            }
            Err(e) => {
                tracing::warn!(env = %env.spec.id, error = format!("{e:#}"), "SnapStart: the snapshot failed; later cold starts boot")
            }
        }
    }

    /// Runs one invocation on `env` and leaves `env` marked broken if it must go.
    async fn run(
        &self,
        env: &mut Env,
        request: InvokeRequest,
        sink: Option<StreamSink>,
    ) -> Invoked {
        let f = &self.function;
        let metrics = &self.ctx.metrics;
        let request_id = request
            .request_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let cold = env.served == 0;
        env.served += 1;
        metrics.invocation(&f.name);
        if cold {
            metrics.cold_start(&f.name);
        }
        let start_line = logs::start_line(&request_id, &self.version);
        self.ctx.logs.write(&f.name, &start_line);
        let init_deadline = tokio::time::Instant::now() + self.ctx.options.init_timeout;
        if cold && f.snapstart {
            self.snapshot_when_initialised(env, init_deadline).await;
        }

        let submitted_ns = monotonic_ns();
        let ticket = env.api.submit(Invocation {
            request_id: request_id.clone(),
            payload: request.payload,
            function_arn: match &request.qualifier {
                Some(q) => format!("{}:{q}", self.ctx.arn(&f.name)),
                None => self.arn.clone(),
            },
            trace_id: request.trace_id.unwrap_or_else(new_trace_id),
            client_context: request.client_context,
            cognito_identity: request.cognito_identity,
            timeout: f.timeout,
            entropy: (cold && f.snapstart).then(fresh_entropy).flatten(),
            network: (cold && f.snapstart)
                .then(|| env.handle.guest_network())
                .flatten(),
            stream: sink,
        });
        let (mut dispatched, mut done) = (ticket.dispatched, ticket.done);
        let mut cancel = self.ctx.cancel.subscribe();
        let begun = Instant::now();

        // Until the runtime takes the event: its init (cold) or an instant (warm). An init
        // error completes `done` without a dispatch, hence `biased`.
        let first = tokio::select! {
            biased;
            c = &mut done => Wait::Done(c.ok().map(Box::new)),
            at = &mut dispatched => at.map_or(Wait::Done(None), Wait::Dispatched),
            reason = env.handle.exited() => Wait::Exited(reason),
            _ = tokio::time::sleep_until(init_deadline) => Wait::InitTimeout,
            _ = until_true(&mut cancel) => Wait::Cancelled,
        };
        let (dispatched_at, second) = match first {
            Wait::Dispatched(at) => {
                if cold {
                    metrics.cold_start_took(&f.name, at - env.started);
                }
                let deadline = tokio::time::Instant::from_std(at + f.timeout);
                let second = tokio::select! {
                    c = &mut done => Wait::Done(c.ok().map(Box::new)),
                    reason = env.handle.exited() => Wait::Exited(reason),
                    _ = tokio::time::sleep_until(deadline) => Wait::Timeout,
                    _ = until_true(&mut cancel) => Wait::Cancelled,
                };
                (at, second)
            }
            other => (begun, other),
        };
        // The error, and for a timeout the line Lambda writes into the function's log.
        let cut_short = matches!(second, Wait::Done(None) | Wait::Cancelled);
        let timed_out = matches!(second, Wait::Timeout | Wait::InitTimeout);
        let (error, note) = match second {
            Wait::Done(Some(completion)) => {
                let stamps = completion.stamps.map(|guest| Stamps {
                    submitted_ns,
                    guest,
                    agent: completion.report.as_ref().and_then(|r| r.event_in_ns.zip(r.result_in_ns)),
                    same_clock: self.function.isolation == Isolation::Sandbox,
                });
                let mut invoked = self.completed(env, &request_id, start_line, dispatched_at, cold, *completion);
                invoked.stamps = stamps;
                return invoked;
            }
            Wait::Exited(reason) => (exit_error(&request_id, &reason), None),
            Wait::InitTimeout => (ErrorBody::new(
                "Runtime.InitTimeout",
                format!(
                    "RequestId: {request_id} Error: the runtime did not ask for an event within {:.2} seconds",
                    self.ctx.options.init_timeout.as_secs_f64()
                ),
            ), None),
            Wait::Timeout => {
                metrics.timeout(&f.name);
                let what = format!("Task timed out after {:.2} seconds", f.timeout.as_secs_f64());
                let note = format!("{} {request_id} {what}", timestamp());
                (
                    ErrorBody::new("Sandbox.Timedout", format!("RequestId: {request_id} Error: {what}")),
                    Some(note),
                )
            }
            // The server dropped the invocation: only when the environment is torn down.
            Wait::Done(None) | Wait::Cancelled | Wait::Dispatched(_) => (shutdown_error(&request_id), None),
        };
        let failure = Failure {
            error,
            note,
            timed_out,
        };
        let mut invoked = self.failed(env, &request_id, start_line, dispatched_at, failure);
        invoked.cut_short = cut_short;
        invoked
    }

    /// Ends an invocation the guest answered (or failed through the Runtime API).
    fn completed(
        &self,
        env: &mut Env,
        request_id: &str,
        start_line: String,
        dispatched_at: Instant,
        cold: bool,
        completion: Completion,
    ) -> Invoked {
        let Completion {
            outcome,
            report,
            log,
            ..
        } = completion;
        if !outcome.keeps_environment() {
            env.broken = true;
        }
        let mut report = report.unwrap_or_else(|| InvocationReport {
            duration_ms: dispatched_at.elapsed().as_secs_f64() * 1000.0,
            ..InvocationReport::default()
        });
        let restore = cold
            .then(|| env.handle.restored_at())
            .flatten()
            .map(|resumed| Restore {
                duration: dispatched_at - env.started,
                billed: dispatched_at.saturating_duration_since(resumed),
            });
        let mut phases = if cold {
            let mut phases = env.handle.start_phases();
            // A restored agent's stamps are those of the boot that took the snapshot.
            if restore.is_none() {
                phases.extend(agent_phases(&report, env.handle.init_started_ns()));
            }
            phases
        } else {
            Vec::new()
        };
        if let Some(took) = env.snapshot_took.take() {
            phases.push(("Snapshot Create", took));
        }
        if restore.is_some() {
            // The runtime's init ran before the snapshot, in another environment: this
            // one restored it, and reports that instead (as Lambda's SnapStart does).
            report.init_duration_ms = None;
        } else if cold && report.init_duration_ms.is_none() {
            // The guest did not measure it (its runtime died first): the host's view of
            // the start, less the phases the environment accounts for (a VM's boot).
            let accounted: Duration = phases.iter().map(|(_, took)| *took).sum();
            let init = (dispatched_at - env.started).saturating_sub(accounted);
            report.init_duration_ms = Some(init.as_secs_f64() * 1000.0);
        }
        // The environment failed it (not the function's own error): the REPORT says so,
        // with the most memory that the guest measured or the host can see.
        let failed_type = match &outcome {
            Outcome::InitError { error_type, .. } => Some(error_type.clone()),
            Outcome::Failed { error, .. } => Some(error.error_type.clone()),
            Outcome::Response(_) | Outcome::FunctionError { .. } => None,
        };
        if failed_type.is_some() {
            let seen = env.handle.memory_peak_mb().unwrap_or(0);
            report.max_memory_used_mb = report.max_memory_used_mb.max(seen);
        }
        let status = failed_type
            .as_deref()
            .map_or(Status::Answered, Status::Error);
        let answer = match outcome {
            Outcome::Response(body) => Answer::Response(body),
            Outcome::FunctionError { error_type, body }
            | Outcome::InitError { error_type, body } => Answer::Error { error_type, body },
            Outcome::Failed { error, .. } => Answer::Error {
                error_type: error.error_type.clone(),
                body: Bytes::from(serde_json::to_vec(&error).unwrap_or_default()),
            },
        };
        let ending = Ending {
            report: &report,
            start: &ColdStart { restore, phases },
            status,
        };
        self.finish(request_id, start_line, log, &ending, answer)
    }

    /// Ends an invocation the guest did not answer, by `failure`: its environment is
    /// killed.
    fn failed(
        &self,
        env: &mut Env,
        request_id: &str,
        start_line: String,
        since: Instant,
        failure: Failure,
    ) -> Invoked {
        let Failure {
            error,
            note,
            timed_out,
        } = failure;
        env.broken = true;
        let reported_mb = env.api.memory_seen_mb();
        let mut log = env.api.abandon();
        if let Some(line) = note {
            self.ctx.logs.write(&self.function.name, &line);
            log.push_str(&line);
            log.push('\n');
        }
        tracing::info!(function = %self.function.name, request_id, error_type = %error.error_type, "invocation failed");
        let report = InvocationReport {
            duration_ms: since.elapsed().as_secs_f64() * 1000.0,
            // The guest cannot answer any more: the most it reported while the invocation
            // ran, or what the host sees of it, before it is stopped.
            max_memory_used_mb: env.handle.memory_peak_mb().unwrap_or(0).max(reported_mb),
            ..InvocationReport::default()
        };
        let answer = Answer::Error {
            error_type: error.error_type.clone(),
            body: Bytes::from(serde_json::to_vec(&error).unwrap_or_default()),
        };
        let status = match timed_out {
            true => Status::Timeout,
            false => Status::Error(&error.error_type),
        };
        let ending = Ending {
            report: &report,
            start: &ColdStart::default(),
            status,
        };
        self.finish(request_id, start_line, log, &ending, answer)
    }

    /// Writes `END` and `REPORT`, counts, and assembles the caller's view.
    fn finish(
        &self,
        request_id: &str,
        start_line: String,
        log: String,
        ending: &Ending<'_>,
        answer: Answer,
    ) -> Invoked {
        let Ending {
            report,
            start: ColdStart { restore, phases },
            status,
        } = *ending;
        let restore = *restore;
        let f = &self.function;
        let metrics = &self.ctx.metrics;
        if matches!(answer, Answer::Error { .. }) {
            metrics.error(&f.name);
        }
        metrics.duration(&f.name, report.duration_ms);
        if let Some(init) = report.init_duration_ms {
            metrics.init(&f.name, init);
        }
        let end = logs::end_line(request_id);
        if let Some(restore) = restore {
            metrics.start_phase(&f.name, "Restore Duration", restore.duration);
        }
        for (phase, took) in phases {
            metrics.start_phase(&f.name, phase, *took);
        }
        let report_line =
            logs::report_line(request_id, f.memory_mb, report, restore, status, phases);
        self.ctx.logs.write_lines(&f.name, &[&end, &report_line]);
        Invoked {
            request_id: request_id.to_string(),
            answer,
            log: format!("{start_line}\n{log}{end}\n{report_line}\n"),
            cut_short: false,
            stamps: None,
        }
    }
}

/// Removes the environment folders (`<function>-<pid>-<n>`) of servers that died without
/// stopping them (SIGKILL): their processes died with them, their sockets and scratch
/// did not; each launcher removes what such an environment left elsewhere. Folders of
/// live servers sharing the state dir are left alone.
fn remove_orphaned_envs<'a>(
    env_root: &std::path::Path,
    launchers: impl Iterator<Item = &'a Arc<dyn Launcher>> + Clone,
) {
    let Ok(entries) = std::fs::read_dir(env_root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let owner = name
            .to_str()
            .and_then(|n| n.rsplit('-').nth(1)?.parse::<u32>().ok());
        let Some(pid) = owner else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            if let Some(id) = name.to_str() {
                launchers.clone().for_each(|l| l.remove_orphan(id));
            }
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::info!(env = ?name, "removed the folder of an environment whose server died")
                }
                Err(e) => {
                    tracing::warn!(env = ?name, error = %e, "cannot remove an orphaned environment folder")
                }
            }
        }
    }
}

/// Why an invocation ended without the guest's answer.
struct Failure {
    error: ErrorBody,
    /// A line for the function's log (Lambda's "Task timed out …").
    note: Option<String>,
    /// Ended by its deadline (`Status: timeout`) rather than by `error`.
    timed_out: bool,
}

/// What an invocation's `REPORT` line says: its figures, its environment's start (first
/// invocations), and how it ended.
struct Ending<'a> {
    report: &'a InvocationReport,
    start: &'a ColdStart,
    status: Status<'a>,
}

/// What the `REPORT` of an environment's first invocation says of its start (nothing for
/// later ones): restored from a snapshot, and its own start phases.
#[derive(Default)]
struct ColdStart {
    restore: Option<Restore>,
    phases: Vec<(&'static str, Duration)>,
}

/// What an invocation waits for.
enum Wait {
    Dispatched(Instant),
    /// Boxed: a completion (its payload's handle, report, log) is far larger than the rest.
    Done(Option<Box<Completion>>),
    Exited(String),
    InitTimeout,
    Timeout,
    Cancelled,
}

/// Resolves once the flag is (or becomes) true; the borrow of the value ends inside, so
/// the future stays `Send`.
pub(crate) async fn until_true(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|v| *v).await;
}

impl Ctx {
    /// A function's (unqualified) ARN.
    fn arn(&self, name: &str) -> String {
        let options = &self.options;
        format!(
            "arn:aws:lambda:{}:{}:function:{name}",
            options.region, options.account_id
        )
    }
}

/// The start phases the agent's stamps tell (first invocation only): `Init Start`, init's
/// start → the agent's, where the environment's init shares the host's clock
/// (`init_started_ns`, a sandbox), and `Agent Start`, the agent's start → the runtime's
/// (reading its configuration, starting extensions); `Init Duration` follows.
fn agent_phases(
    report: &InvocationReport,
    init_started_ns: Option<u64>,
) -> Vec<(&'static str, Duration)> {
    let mut phases = Vec::new();
    let Some(agent) = report.agent_started_ns else {
        return phases;
    };
    if let Some(init) = init_started_ns.filter(|init| *init <= agent) {
        phases.push(("Init Start", Duration::from_nanos(agent - init)));
    }
    if let Some(runtime) = report.runtime_started_ns.filter(|r| *r >= agent) {
        phases.push(("Agent Start", Duration::from_nanos(runtime - agent)));
    }
    phases
}

fn exit_error(request_id: &str, reason: &str) -> ErrorBody {
    ErrorBody::new(
        "Runtime.ExitError",
        format!("RequestId: {request_id} Error: Runtime exited with error: {reason}"),
    )
}

fn shutdown_error(request_id: &str) -> ErrorBody {
    ErrorBody::new(
        "Runtime.Unknown",
        format!("RequestId: {request_id} Error: the server shut down during the invocation"),
    )
}

/// [`kindling_wire::ENTROPY_BYTES`] from the host's kernel, for a SnapStart guest to
/// reseed its own; `None` (logged) if they cannot be read.
fn fresh_entropy() -> Option<Vec<u8>> {
    use std::io::Read;
    let mut bytes = vec![0; kindling_wire::ENTROPY_BYTES];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        Ok(()) => Some(bytes),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read /dev/urandom: the guest is not re-seeded");
            None
        }
    }
}

/// An X-Ray style trace header: `Root=1-<epoch hex>-<96 random bits>;Parent=<64 bits>;Sampled=0`.
fn new_trace_id() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let r = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "Root=1-{secs:08x}-{};Parent={};Sampled=0",
        &r[..24],
        &r[16..32]
    )
}

/// `YYYY/MM/DD` in UTC, for log stream names.
fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}/{m:02}/{d:02}")
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` in UTC, as Lambda stamps its own log lines.
pub(crate) fn timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (y, m, d) = civil_from_days(secs / 86_400);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        now.subsec_millis()
    )
}

/// Howard Hinnant's days-to-civil algorithm (Gregorian, UTC) for `days` since 1970-01-01:
/// (year, month, day). Only dates from the epoch on are needed, so it runs unsigned (every
/// intermediate is non-negative).
pub(crate) fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + u64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_stamps_split_its_start_from_inits() {
        let report = InvocationReport {
            agent_started_ns: Some(5_000_000),
            runtime_started_ns: Some(7_500_000),
            ..InvocationReport::default()
        };
        let ms = |ms: u64| Duration::from_millis(ms) / 2;
        assert_eq!(
            agent_phases(&report, Some(1_000_000)),
            vec![("Init Start", ms(8)), ("Agent Start", ms(5))]
        );
        // A microVM's init runs on the guest's clock: only the agent's own phase.
        assert_eq!(agent_phases(&report, None), vec![("Agent Start", ms(5))]);
        // Stamps out of order (another clock) say nothing.
        assert!(agent_phases(&report, Some(9_000_000)).len() == 1);
        assert!(agent_phases(&InvocationReport::default(), Some(1)).is_empty());
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(10_956), (1999, 12, 31));
    }

    #[test]
    fn trace_ids_look_like_xray() {
        let t = new_trace_id();
        assert!(t.starts_with("Root=1-") && t.ends_with(";Sampled=0"), "{t}");
        assert_eq!(
            t.len(),
            "Root=1-".len() + 8 + 1 + 24 + ";Parent=".len() + 16 + ";Sampled=0".len()
        );
    }

    #[test]
    fn only_the_folders_of_dead_servers_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let dead = root.path().join("my-fn-999999999-1"); // above any pid_max
        let live = root.path().join(format!("my-fn-{}-2", std::process::id()));
        let other = root.path().join("not-an-env");
        for dir in [&dead, &live, &other] {
            std::fs::create_dir(dir).unwrap();
            std::fs::write(dir.join("vsock.sock_9001"), b"").unwrap();
        }
        let launcher = OrphanRecorder::default();
        let orphans = launcher.0.clone();
        let launchers: Vec<Arc<dyn Launcher>> = vec![Arc::new(launcher)];
        remove_orphaned_envs(root.path(), launchers.iter());
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
        assert_eq!(*orphans.lock().unwrap(), ["my-fn-999999999-1"]);
    }

    /// A launcher that only notes the orphans it is told about.
    #[derive(Default)]
    struct OrphanRecorder(Arc<Mutex<Vec<String>>>);

    #[async_trait::async_trait]
    impl Launcher for OrphanRecorder {
        fn name(&self) -> &str {
            "recorder"
        }
        async fn start(&self, _: &EnvironmentSpec) -> anyhow::Result<Box<dyn Environment>> {
            anyhow::bail!("starts nothing")
        }
        fn remove_orphan(&self, id: &str) {
            self.0.lock().unwrap().push(id.to_string());
        }
    }
}
