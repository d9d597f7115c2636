//! [`Server`]: everything the `kindling serve` / `kindling run` commands start, as one
//! value: the Invoke API with the control plane, function URLs, the scheduler with its environments, the
//! database (function registry and durable event queue), logs and metrics.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};

use crate::body::BodyBudget;
use crate::connections::ConnectionLimits;
use crate::control_plane::{self, ControlPlane, DeployError, Deployer};
use crate::credentials::HostCredentials;
use crate::environment::{Credentials, Function, Isolation, Launcher};
use crate::events::{EventQueue, EventQueueOptions};
use crate::function_url::{PayloadFormat, UrlConfig, UrlServers};
use crate::invoke_api::{self, InvokeApi};
use crate::logs::{self, LogLine, LogSink};
use crate::metrics::Metrics;
use crate::scheduler::{Scheduler, SchedulerOptions};
use crate::store::{EventInvokeConfig, FunctionRecord, Origin, QueueBounds, Store, LATEST};

/// Where Lambda's local emulator listens, and so where callers look first.
pub const DEFAULT_INVOKE_ADDR: &str = "127.0.0.1:9000";

/// How a [`Server`] runs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The Invoke API's address; port 0 picks a free one (see [`Server::local_addr`]).
    pub invoke_addr: SocketAddr,
    /// Holds `kindling.db` (the function registry and the event queue), `code/` (zips
    /// uploaded through the control plane, by SHA-256), `destinations/` (JSON Lines
    /// destinations), `envs/` (one directory per environment, removed when it stops) and
    /// `logs/<function>.log` (with `logs/<function>.log.1` once rotated). Unix socket
    /// paths are short: keep this short too.
    pub state_dir: PathBuf,
    /// A warm environment unused this long is stopped.
    pub idle_timeout: Duration,
    /// An idle environment is frozen once it has been idle this long; `None`: never.
    pub freeze_after: Option<Duration>,
    /// Callers that may wait per function once every environment is busy.
    pub queue_depth: usize,
    /// Accepted `Event` invocations per function not yet finished (queued or running,
    /// on disk); past it, or past `event_queue_bytes` of their payloads, an `Event` gets
    /// 429.
    pub event_queue_depth: usize,
    pub event_queue_bytes: usize,
    /// Wait before an `Event`'s first retry; the second waits twice as long (Lambda's
    /// one and two minutes by default; milliseconds in tests).
    pub event_retry_base: Duration,
    /// How functions created through the control plane are isolated.
    pub default_isolation: Isolation,
    /// The event-invoke settings of functions.toml's functions, by name (the API's
    /// `PutFunctionEventInvokeConfig` is refused for them: the file is their source).
    pub event_invoke: BTreeMap<String, EventInvokeConfig>,
    /// functions.toml's functions served over HTTP (function URLs), by name: each on its
    /// own listener at the Invoke API's address and its port (0: a free one; see
    /// [`Server::function_urls`]). Those created through the control plane are in the
    /// registry.
    pub function_urls: BTreeMap<String, UrlConfig>,
    /// Readies uploaded code for the launchers; `None` runs it as uploaded (the zip's
    /// path is the function's code), for launchers that need nothing more.
    pub deployer: Option<Arc<dyn Deployer>>,
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
    /// Bytes of callers' request bodies (Invoke payloads, function URL and control plane
    /// requests) held at once over every connection; a body past it is answered 429
    /// `TooManyRequestsException` and its connection closed.
    pub max_body_memory: usize,
    /// The region of ARNs, and the functions' `AWS_REGION`.
    pub region: String,
    /// The account of ARNs.
    pub account_id: String,
    /// Whether functions that do not say (those created through the API among them) get
    /// the host's AWS credentials.
    pub default_credentials: Credentials,
    /// The host's AWS credentials, for the functions that get them.
    pub host_credentials: Option<HostCredentials>,
    /// Every answered synchronous invocation carries where its time went, hop by hop
    /// ([`crate::hops::HEADER_HOPS`]).
    pub trace_hops: bool,
}

impl ServerOptions {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let defaults = SchedulerOptions::new(PathBuf::new());
        let events = EventQueueOptions::default();
        Self {
            invoke_addr: DEFAULT_INVOKE_ADDR.parse().expect("a valid address"),
            state_dir: state_dir.into(),
            idle_timeout: defaults.idle_timeout,
            freeze_after: defaults.freeze_after,
            queue_depth: defaults.queue_depth,
            event_queue_depth: events.bounds.events,
            event_queue_bytes: events.bounds.bytes,
            event_retry_base: events.retry_base,
            default_isolation: Isolation::MicroVm,
            event_invoke: BTreeMap::new(),
            function_urls: BTreeMap::new(),
            deployer: None,
            init_timeout: defaults.init_timeout,
            shutdown_grace: defaults.shutdown_grace,
            log_file_max_bytes: logs::DEFAULT_MAX_FILE_BYTES,
            header_read_timeout: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(120),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_body_memory: 256 << 20,
            region: defaults.region,
            account_id: defaults.account_id,
            default_credentials: defaults.default_credentials,
            host_credentials: None,
            trace_hops: false,
        }
    }
}

/// Runs uploaded code as it is.
#[derive(Debug)]
struct AsUploaded;

impl Deployer for AsUploaded {
    fn prepare(&self, function: Function) -> Result<Function, DeployError> {
        Ok(function)
    }
}

/// A bound, not yet running, Kindling host.
pub struct Server {
    listener: TcpListener,
    /// One listener per function URL, by function name, served from [`Server::run`] on.
    url_listeners: Vec<(String, PayloadFormat, TcpListener)>,
    urls: Arc<UrlServers>,
    scheduler: Arc<Scheduler>,
    metrics: Arc<Metrics>,
    logs: Arc<LogSink>,
    limits: ConnectionLimits,
    store: Arc<Store>,
    events: Arc<EventQueue>,
    deployer: Arc<dyn Deployer>,
    options: ServerOptions,
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
    /// Binds the Invoke API, opens the database and prepares the state directory.
    /// `functions` (functions.toml's) join those created through the control plane in
    /// one registry; every function's isolation needs a launcher in `launchers`.
    pub async fn bind(
        functions: Vec<Function>,
        launchers: HashMap<Isolation, Arc<dyn Launcher>>,
        options: ServerOptions,
    ) -> anyhow::Result<Self> {
        let store = Arc::new(Store::open(&options.state_dir)?);
        let deployer = options
            .deployer
            .clone()
            .unwrap_or_else(|| Arc::new(AsUploaded));
        let functions = registry(&store, functions, &options.event_invoke, deployer.as_ref())?;
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
        sched.init_timeout = options.init_timeout;
        sched.shutdown_grace = options.shutdown_grace;
        sched.region.clone_from(&options.region);
        sched.account_id.clone_from(&options.account_id);
        sched.default_credentials = options.default_credentials;
        sched.host_credentials = options.host_credentials.clone().map(Arc::new);
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
        let limits = ConnectionLimits {
            header_read_timeout: options.header_read_timeout,
            keep_alive_timeout: options.keep_alive_timeout,
            body_read_timeout: options.body_read_timeout,
            max_connections: options.max_connections,
            bodies: BodyBudget::new(options.max_body_memory),
        };
        let urls = Arc::new(UrlServers::new(
            scheduler.clone(),
            limits.clone(),
            options.invoke_addr.ip(),
        ));
        let mut url_listeners = Vec::new();
        for (name, url) in &options.function_urls {
            let l = urls.bind(url.port).await.with_context(|| {
                format!("function URL of {name}: cannot listen on port {}", url.port)
            })?;
            url_listeners.push((name.clone(), url.payload, l));
        }
        for record in store.functions()? {
            if let Some(l) = api_url_listener(&store, &urls, record).await? {
                url_listeners.push(l);
            }
        }
        let events = Arc::new(EventQueue::new(
            store.clone(),
            scheduler.clone(),
            metrics.clone(),
            EventQueueOptions {
                bounds: QueueBounds {
                    events: options.event_queue_depth,
                    bytes: options.event_queue_bytes,
                },
                retry_base: options.event_retry_base,
            },
            options.state_dir.join("destinations"),
        ));
        Ok(Self {
            listener,
            url_listeners,
            urls,
            scheduler,
            metrics,
            logs,
            store,
            events,
            deployer,
            limits,
            options,
        })
    }

    /// The Invoke API's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Each function URL's function and address, in name order.
    pub fn function_urls(&self) -> Vec<(String, SocketAddr)> {
        self.url_listeners
            .iter()
            .filter_map(|(name, _, l)| Some((name.clone(), l.local_addr().ok()?)))
            .collect()
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
        let control = ControlPlane {
            store: self.store.clone(),
            scheduler: self.scheduler.clone(),
            deployer: self.deployer.clone(),
            code_dir: self.options.state_dir.join("code"),
            default_isolation: self.options.default_isolation,
            limits: self.limits.clone(),
            changes: tokio::sync::Mutex::new(()),
            uploads: ControlPlane::uploads(),
            urls: self.urls.clone(),
        };
        let api = Arc::new(InvokeApi {
            scheduler: self.scheduler.clone(),
            metrics: self.metrics.clone(),
            limits: self.limits.clone(),
            events: self.events.clone(),
            control,
            trace_hops: self.options.trace_hops,
        });
        for (function, payload, listener) in self.url_listeners {
            self.urls
                .serve(&function, listener, payload)
                .with_context(|| format!("function URL of {function}"))?;
        }
        let serving = tokio::spawn(invoke_api::serve(self.listener, api, stop_rx));
        let scheduler = self.scheduler.clone();
        let reaper = tokio::spawn(async move { scheduler.retire_idle().await });
        let (stop_events, events_stop) = watch::channel(false);
        let dispatcher = tokio::spawn(self.events.clone().dispatch(events_stop));
        shutdown.await;
        tracing::info!("shutting down");
        // No new attempts; those running end with the scheduler (and stay queued if cut).
        stop_events.send_replace(true);
        // Answers in progress are still written while environments drain.
        self.scheduler.shutdown().await;
        dispatcher.await.context("the event dispatcher failed")?;
        stop_tx.send_replace(true);
        serving.await.context("the Invoke API task failed")?;
        self.urls.shutdown().await;
        reaper.await.context("the idle reaper failed")?;
        remove_if_empty(self.scheduler.env_root());
        tracing::info!("stopped");
        Ok(())
    }
}

/// The functions to schedule, each with its version: functions.toml's, written to the
/// registry (replacing what an earlier start wrote of the file, which is their source),
/// then those created through the control plane and their published versions, their code
/// readied again (from the image cache: quick). One that cannot be readied is left out,
/// shown `Failed` by the control plane, and kept.
fn registry(
    store: &Store,
    from_file: Vec<Function>,
    event_invoke: &BTreeMap<String, EventInvokeConfig>,
    deployer: &dyn Deployer,
) -> anyhow::Result<Vec<(Function, String)>> {
    let known = store.functions()?;
    for f in &from_file {
        if known
            .iter()
            .any(|r| r.name == f.name && r.origin == Origin::Api)
        {
            anyhow::bail!(
                "function {} is in the functions file and was also created through the API (in {}): rename one, or delete the API's with `aws lambda delete-function` after starting without it",
                f.name,
                crate::store::DB_FILE
            );
        }
    }
    for stale in known
        .iter()
        .filter(|r| r.origin == Origin::File && !from_file.iter().any(|f| f.name == r.name))
    {
        store.delete_function(&stale.name)?;
    }
    for f in &from_file {
        let mut record = file_record(f);
        record.event_invoke = event_invoke.get(&f.name).cloned().map(|mut c| {
            c.last_modified.clone_from(&record.last_modified);
            c
        });
        store.put_function(&record)?;
    }
    let mut functions: Vec<(Function, String)> = from_file
        .into_iter()
        .map(|f| (f, LATEST.to_string()))
        .collect();
    for latest in known.into_iter().filter(|r| r.origin == Origin::Api) {
        // Each version keeps to the function's concurrency, as it is now.
        let mut versions = store.versions(&latest.name)?;
        for v in &mut versions {
            v.max_concurrency = latest.max_concurrency;
        }
        for record in std::iter::once(latest).chain(versions) {
            let prepared = control_plane::function_of(&record)
                .map_err(DeployError::Refused)
                .and_then(|f| deployer.prepare(f));
            match prepared {
                Ok(function) => functions.push((function, record.version)),
                Err(e) => {
                    tracing::error!(function = %record.name, version = %record.version, error = %format!("{e:#}"), "cannot ready the function's code: it stays Failed until its code is updated")
                }
            }
        }
    }
    Ok(functions)
}

/// The listener of a function URL created through the control plane, on the port it had
/// (its URL stays the same across restarts), else on a free one, recorded.
async fn api_url_listener(
    store: &Store,
    urls: &UrlServers,
    mut record: FunctionRecord,
) -> anyhow::Result<Option<(String, PayloadFormat, TcpListener)>> {
    let Some(url) = record.url.as_mut().filter(|_| record.origin == Origin::Api) else {
        return Ok(None);
    };
    let listener = match urls.bind(url.port).await {
        Ok(l) => l,
        Err(e) => {
            let l = urls
                .bind(0)
                .await
                .with_context(|| format!("function URL of {}: cannot listen", record.name))?;
            let port = l.local_addr()?.port();
            tracing::warn!(function = %record.name, old = url.port, new = port, error = %e, "the function URL's port is taken: its URL changes");
            url.port = port;
            store.put_function(&record)?;
            l
        }
    };
    Ok(Some((record.name, PayloadFormat::V2, listener)))
}

/// The registry's record of a functions.toml function.
fn file_record(f: &Function) -> FunctionRecord {
    FunctionRecord {
        name: f.name.clone(),
        version: LATEST.to_string(),
        last_version: 0,
        origin: Origin::File,
        runtime: f.runtime.clone(),
        image: f.runtime.clone(),
        handler: f.handler.clone(),
        memory_mb: f.memory_mb,
        timeout_s: u32::try_from(f.timeout.as_secs()).unwrap_or(u32::MAX),
        env: f.env.clone(),
        role: None,
        description: "defined in functions.toml".into(),
        code: f.code.clone(),
        code_sha256: String::new(),
        code_size: 0,
        isolation: f.isolation.name().to_string(),
        max_concurrency: f.max_concurrency,
        reserved_concurrency: None,
        last_modified: control_plane::last_modified(),
        revision_id: uuid::Uuid::new_v4().to_string(),
        event_invoke: None,
        layers: Vec::new(),
        url: None,
    }
}

fn remove_if_empty(dir: &Path) {
    // Fails, as meant, when something is left in it.
    let _ = std::fs::remove_dir(dir);
}
