//! The Runtime API server of one environment, on the Unix socket its guest reaches
//! (`<env dir>/vsock.sock_9001`).
//!
//! The scheduler [`RuntimeApi::submit`]s one invocation at a time; the guest takes it
//! with `GET /next` (which blocks, without a timeout, until there is one) and answers it
//! with `/response` or `/error`. Everything the guest says about the invocation (log
//! lines, the report, the death of its runtime) is gathered here and handed back to the
//! scheduler in one [`Completion`].

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kindling_wire::quiet_stream::QuietUnixStream;
use kindling_wire::{
    self as wire, monotonic_ns, ErrorBody, FunctionEnvironment, InvocationReport, RuntimeExit,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::{JoinHandle, JoinSet};

use crate::body::{self, BodyError, InBody};
use crate::hops::GuestStamps;
use crate::logs::{LogSink, LogTail};
use crate::streaming::{self, Relayed, StreamSink};

mod framed;

/// Largest log post (`/kindling/v1/logs`) the server takes at once.
const MAX_LOG_POST: usize = 1 << 20;
/// Largest report or exit notice.
const MAX_SMALL_POST: usize = 64 << 10;
/// How many finished request ids are remembered, to tell a late or double answer (403)
/// from an id that never existed (400).
const FINISHED_MEMORY: usize = 64;

/// One event for the guest.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub request_id: String,
    pub payload: Bytes,
    pub function_arn: String,
    pub trace_id: String,
    pub client_context: Option<String>,
    pub cognito_identity: Option<String>,
    /// The function's timeout; the deadline starts when the guest takes the event.
    pub timeout: Duration,
    /// Fresh random bytes for the guest kernel ([`wire::HEADER_ENTROPY`]): on the first
    /// event of a SnapStart environment, whose random pool its clones share.
    pub entropy: Option<Vec<u8>>,
    /// The environment's own network ([`wire::HEADER_NETWORK`]): on the first event of a
    /// SnapStart microVM, which may resume with the address of the one that took the
    /// snapshot.
    pub network: Option<wire::GuestNetwork>,
    /// Where a streamed `/response` goes as it arrives (`InvokeWithResponseStream`,
    /// function URLs); `None`: a streamed response is gathered into one payload.
    pub stream: Option<StreamSink>,
}

/// What became of an invocation, as far as the guest is concerned.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `/response`: the payload for the caller (empty when it was streamed to the
    /// invocation's [`Invocation::stream`]).
    Response(Bytes),
    /// `/error`: a function error. `error_type` is normalised; `body` is the JSON the
    /// caller gets.
    FunctionError { error_type: String, body: Bytes },
    /// `/init/error`: the runtime could not start.
    InitError { error_type: String, body: Bytes },
    /// The runtime died (`Runtime.ExitError`), or answered too much
    /// (`Function.ResponseSizeTooLarge`): the environment must not be trusted further
    /// when `reset` is set.
    Failed { error: ErrorBody, reset: bool },
}

impl Outcome {
    /// Whether the environment may serve another invocation.
    pub fn keeps_environment(&self) -> bool {
        matches!(self, Outcome::Response(_) | Outcome::FunctionError { .. })
            || matches!(self, Outcome::Failed { reset: false, .. })
    }
}

/// The end of an invocation: its outcome plus what the guest reported on the way.
#[derive(Debug, Clone)]
pub struct Completion {
    pub outcome: Outcome,
    pub report: Option<InvocationReport>,
    /// The runtime's log lines of this invocation, or of a long log only its end (see
    /// [`LogTail`]): the whole log is in the function's log file.
    pub log: String,
    /// The host's stamps of an invocation the guest answered (see [`crate::hops`]).
    pub stamps: Option<GuestStamps>,
}

/// The scheduler's side of a submitted invocation.
#[derive(Debug)]
pub struct Ticket {
    /// Resolves when the guest's `/next` took the event, with the instant it did.
    pub dispatched: oneshot::Receiver<Instant>,
    /// Resolves when the guest answered (or failed) the invocation.
    pub done: oneshot::Receiver<Completion>,
}

struct Pending {
    invocation: Invocation,
    dispatched: oneshot::Sender<Instant>,
    done: oneshot::Sender<Completion>,
}

struct InFlight {
    request_id: String,
    done: oneshot::Sender<Completion>,
    stream: Option<StreamSink>,
    report: Option<InvocationReport>,
    log: LogTail,
    /// [`monotonic_ns`] of the `/next` answer and of the result's arrival.
    handed_ns: u64,
    result_ns: Option<u64>,
    /// The most memory the agent said the runtime used so far ([`wire::PATH_MEMORY`]).
    memory_seen_mb: u64,
}

#[derive(Default)]
struct State {
    pending: Option<Pending>,
    in_flight: Option<InFlight>,
    finished: VecDeque<String>,
    /// An `/init/error` posted while no invocation was waiting: it belongs to the next.
    init_error: Option<Outcome>,
}

impl State {
    fn remember(&mut self, id: String) {
        if self.finished.len() == FINISHED_MEMORY {
            self.finished.pop_front();
        }
        self.finished.push_back(id);
    }

    /// Ends the invocation in flight (or, failing that, the one waiting for `/next`).
    fn complete_current(&mut self, outcome: Outcome) -> bool {
        if let Some(f) = self.in_flight.take() {
            self.remember(f.request_id);
            let stamps = f.result_ns.map(|result_ns| GuestStamps {
                handed_ns: f.handed_ns,
                result_ns,
                done_ns: monotonic_ns(),
            });
            let _ = f.done.send(Completion {
                outcome,
                report: f.report,
                log: f.log.into_string(),
                stamps,
            });
            true
        } else if let Some(p) = self.pending.take() {
            self.remember(p.invocation.request_id);
            let _ = p.done.send(Completion {
                outcome,
                report: None,
                log: String::new(),
                stamps: None,
            });
            true
        } else {
            false
        }
    }

    /// Checks that `id` may be answered now: 400 for an id never seen, 403 for one that
    /// is finished, not yet handed out, or when nothing is in flight.
    fn check_answer(&self, id: &str) -> Result<(), Refusal> {
        match &self.in_flight {
            Some(f) if f.request_id == id => Ok(()),
            Some(_) if !self.finished.iter().any(|f| f == id) && !self.is_pending(id) => {
                Err(Refusal {
                    status: StatusCode::BAD_REQUEST,
                    error_type: "InvalidRequestID",
                    message: format!("Invalid request ID: {id:?} is not the invocation in flight"),
                })
            }
            _ => Err(Refusal {
                status: StatusCode::FORBIDDEN,
                error_type: "InvalidStateTransition",
                message: format!(
                    "State transition is not allowed: no invocation {id:?} awaits an answer"
                ),
            }),
        }
    }

    fn is_pending(&self, id: &str) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| p.invocation.request_id == id)
    }
}

/// A request the Runtime API turns down, before it becomes an answer.
struct Refusal {
    status: StatusCode,
    error_type: &'static str,
    message: String,
}

impl From<Refusal> for Response<Full<Bytes>> {
    fn from(r: Refusal) -> Self {
        error_response(r.status, r.error_type, &r.message)
    }
}

struct Shared {
    function_name: String,
    environment: FunctionEnvironment,
    logs: Arc<LogSink>,
    state: Mutex<State>,
    next_ready: Notify,
    /// `/next` requests waiting with nothing to hand over: above 0, the runtime is done
    /// with its last event and idle, as Lambda sees it before it freezes an environment.
    parked: watch::Sender<usize>,
    /// Bumped when the guest's connections were reset ([`RuntimeApi::connections_reset`]):
    /// a `/next` that began before never takes an event.
    epoch: AtomicU64,
    exchanges: Counters,
}

/// Which path the guest's calls took (see [`RuntimeApi::exchanges`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Exchanges {
    /// Frame streams the agent opened ([`kindling_wire::frame`]).
    pub streams: u64,
    /// Calls that came as HTTP requests (the upgrade itself not counted).
    pub http: u64,
    /// Calls that came as frames.
    pub framed: u64,
}

#[derive(Default)]
struct Counters {
    streams: AtomicU64,
    http: AtomicU64,
    framed: AtomicU64,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running Runtime API server for one environment. Dropping it stops the server and
/// every connection it has.
pub struct RuntimeApi {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    socket: PathBuf,
}

impl std::fmt::Debug for RuntimeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeApi")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.task.abort();
        // The guest may be gone already; a missing socket file is fine.
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl RuntimeApi {
    /// Binds `socket` (which must not exist) and serves it.
    pub fn bind(
        socket: &Path,
        environment: FunctionEnvironment,
        logs: Arc<LogSink>,
    ) -> io::Result<Self> {
        let listener = UnixListener::bind(socket)?;
        let shared = Arc::new(Shared {
            function_name: environment.function_name.clone(),
            environment,
            logs,
            state: Mutex::default(),
            next_ready: Notify::new(),
            parked: watch::Sender::new(0),
            epoch: AtomicU64::new(0),
            exchanges: Counters::default(),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            shared,
            task,
            socket: socket.to_path_buf(),
        })
    }

    /// Hands an invocation to the guest. Only one may be submitted at a time; an
    /// `/init/error` the runtime posted before completes it at once.
    pub fn submit(&self, invocation: Invocation) -> Ticket {
        let (dispatched_tx, dispatched) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        let mut state = self.shared.state();
        if let Some(outcome) = state.init_error.take() {
            state.remember(invocation.request_id);
            let _ = done_tx.send(Completion {
                outcome,
                report: None,
                log: String::new(),
                stamps: None,
            });
        } else {
            debug_assert!(state.pending.is_none() && state.in_flight.is_none());
            state.pending = Some(Pending {
                invocation,
                dispatched: dispatched_tx,
                done: done_tx,
            });
            self.shared.next_ready.notify_one();
        }
        Ticket { dispatched, done }
    }

    /// Resolves once the guest waits in `/next` with nothing to hand over (at once if it
    /// does now); `false` when the server is gone.
    pub fn parked(&self) -> impl std::future::Future<Output = bool> + Send + 'static {
        let mut parked = self.shared.parked.subscribe();
        async move { parked.wait_for(|n| *n > 0).await.is_ok() }
    }

    /// Resolves once the runtime has initialised: it waits in `/next` and neither failed
    /// its init nor died on the way; `false` when it did, or the server is gone.
    pub fn initialised(&self) -> impl std::future::Future<Output = bool> + Send + 'static {
        let parked = self.parked();
        let shared = self.shared.clone();
        async move { parked.await && shared.state().init_error.is_none() }
    }

    /// The guest's connections to this server were reset under it (a snapshot was taken:
    /// the VMM closes their host ends): a `/next` still waiting here belongs to a dead
    /// connection, which the server may not have noticed yet, and must not swallow the
    /// next event. It ends at once; the guest's agent asks again on a new connection.
    pub fn connections_reset(&self) {
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        self.shared.next_ready.notify_waiters();
    }

    /// How many calls the guest made over HTTP and over frames so far: an agent that
    /// negotiated its frame stream makes every call of an invocation as frames.
    pub fn exchanges(&self) -> Exchanges {
        let c = &self.shared.exchanges;
        Exchanges {
            streams: c.streams.load(Ordering::Relaxed),
            http: c.http.load(Ordering::Relaxed),
            framed: c.framed.load(Ordering::Relaxed),
        }
    }

    /// The most memory the agent reported for the invocation in flight (0: none yet).
    pub fn memory_seen_mb(&self) -> u64 {
        self.shared
            .state()
            .in_flight
            .as_ref()
            .map_or(0, |f| f.memory_seen_mb)
    }

    /// Gives up on the current invocation (timeout, crash): later answers for it get 403.
    /// Returns (the end of) what the guest had logged for it.
    pub fn abandon(&self) -> String {
        let mut state = self.shared.state();
        if let Some(f) = state.in_flight.take() {
            state.remember(f.request_id);
            f.log.into_string()
        } else if let Some(p) = state.pending.take() {
            state.remember(p.invocation.request_id);
            String::new()
        } else {
            String::new()
        }
    }
}

async fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    // Connections live in the set, so stopping this task closes them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, shared.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "runtime API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One guest connection: HTTP/1.1, until the agent upgrades it to a frame stream
/// ([`framed`]), which then runs in this same task.
async fn serve_connection(stream: UnixStream, shared: Arc<Shared>) {
    // Registered for reading only: the agent reading each answer would otherwise wake
    // this server for nothing ([`QuietUnixStream`]).
    let stream = match stream.into_std().and_then(QuietUnixStream::new) {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(error = %e, "runtime API connection: cannot take its socket");
            return;
        }
    };
    let upgrade = Arc::new(Mutex::new(None));
    let service = {
        let (shared, upgrade) = (shared.clone(), upgrade.clone());
        service_fn(move |mut req| {
            let (shared, upgrade) = (shared.clone(), upgrade.clone());
            async move {
                if framed::wants_upgrade(&req) {
                    *upgrade.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(hyper::upgrade::on(&mut req));
                    return Ok::<_, Infallible>(framed::switching());
                }
                shared.exchanges.http.fetch_add(1, Ordering::Relaxed);
                Ok(handle(&shared, req).await)
            }
        })
    };
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(error = %e, "runtime API connection ended with an error");
    }
    let upgrade = upgrade.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(upgrade) = upgrade {
        match upgrade.await {
            Ok(upgraded) => framed::serve(&shared, TokioIo::new(upgraded)).await,
            Err(e) => tracing::debug!(error = %e, "frame stream upgrade failed"),
        }
    }
}

async fn handle<B: InBody>(shared: &Shared, req: Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let get = req.method() == Method::GET;
    let post = req.method() == Method::POST;
    let invocation = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|p| p.strip_prefix("/invocation/"))
            .and_then(|rest| rest.split_once('/'))
            .map(|(id, what)| (id.to_string(), what.to_string()))
    };
    match path.as_str() {
        wire::PATH_NEXT if get => next(shared).await,
        wire::PATH_ENVIRONMENT if get => json_response(StatusCode::OK, &shared.environment),
        wire::PATH_INIT_ERROR if post => init_error(shared, req).await,
        wire::PATH_LOGS if post => post_logs(shared, req).await,
        wire::PATH_RUNTIME_EXIT if post => runtime_exit(shared, req).await,
        wire::PATH_MEMORY if post => memory_use(shared, req).await,
        wire::PATH_NEXT
        | wire::PATH_ENVIRONMENT
        | wire::PATH_INIT_ERROR
        | wire::PATH_LOGS
        | wire::PATH_RUNTIME_EXIT
        | wire::PATH_MEMORY => method_not_allowed(),
        _ => match invocation(wire::RUNTIME_PREFIX) {
            Some((id, what)) if what == "response" || what == "error" => {
                match (post, what.as_str()) {
                    (true, "response") => response(shared, &id, req).await,
                    (true, _) => function_error(shared, &id, req).await,
                    (false, _) => method_not_allowed(),
                }
            }
            _ => error_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no such endpoint: {} {path}", req.method()),
            ),
        },
    }
}

async fn next(shared: &Shared) -> Response<Full<Bytes>> {
    let epoch = shared.epoch.load(Ordering::SeqCst);
    // Counted from its first wait until it answers (or the guest hangs up).
    let mut parked = None;
    loop {
        {
            let mut state = shared.state();
            if shared.epoch.load(Ordering::SeqCst) != epoch {
                // A wakeup meant for a live `/next` may have reached this one instead.
                shared.next_ready.notify_one();
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Kindling.ConnectionReset",
                    "the guest's connections were reset (snapshot): ask again",
                );
            }
            if state.in_flight.is_some() {
                return error_response(
                    StatusCode::FORBIDDEN,
                    "InvalidStateTransition",
                    "State transition is not allowed: the invocation in flight has no answer yet",
                );
            }
            if let Some(p) = state.pending.take() {
                let now = Instant::now();
                let inv = p.invocation;
                let response = match event_response(&inv) {
                    Ok(r) => r,
                    Err(e) => {
                        // The Invoke API checks header values; this is a bug, not bad input.
                        tracing::error!(error = %e, "cannot build the /next answer");
                        state.remember(inv.request_id);
                        let _ = p.done.send(Completion {
                            outcome: Outcome::Failed {
                                error: ErrorBody::new(
                                    "Runtime.Unknown",
                                    format!("cannot hand the event over: {e}"),
                                ),
                                reset: false,
                            },
                            report: None,
                            log: String::new(),
                            stamps: None,
                        });
                        return error_response(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "Internal",
                            &e.to_string(),
                        );
                    }
                };
                state.in_flight = Some(InFlight {
                    request_id: inv.request_id,
                    done: p.done,
                    stream: inv.stream,
                    report: None,
                    log: LogTail::default(),
                    handed_ns: monotonic_ns(),
                    result_ns: None,
                    memory_seen_mb: 0,
                });
                let _ = p.dispatched.send(now);
                return response;
            }
        }
        parked.get_or_insert_with(|| Parked::new(&shared.parked));
        shared.next_ready.notified().await;
    }
}

/// One `/next` counted in [`Shared::parked`] while it lives.
struct Parked<'a>(&'a watch::Sender<usize>);

impl<'a> Parked<'a> {
    fn new(count: &'a watch::Sender<usize>) -> Self {
        count.send_modify(|n| *n += 1);
        Self(count)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The `/next` answer: the event and every header of the contract. The deadline counts
/// from now, when the runtime takes the event.
fn event_response(inv: &Invocation) -> http::Result<Response<Full<Bytes>>> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let deadline_ms = now.saturating_add(inv.timeout).as_millis();
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(wire::HEADER_REQUEST_ID, &inv.request_id)
        .header(wire::HEADER_DEADLINE_MS, millis(deadline_ms))
        .header(wire::HEADER_HOST_TIME_MS, millis(now.as_millis()))
        .header(wire::HEADER_FUNCTION_ARN, &inv.function_arn)
        .header(wire::HEADER_TRACE_ID, &inv.trace_id);
    if let Some(cc) = &inv.client_context {
        builder = builder.header(wire::HEADER_CLIENT_CONTEXT, cc);
    }
    if let Some(ci) = &inv.cognito_identity {
        builder = builder.header(wire::HEADER_COGNITO_IDENTITY, ci);
    }
    if let Some(entropy) = &inv.entropy {
        builder = builder.header(wire::HEADER_ENTROPY, wire::to_hex(entropy));
    }
    if let Some(network) = &inv.network {
        // JSON of addresses and a name the launcher chose: no control characters.
        let json = serde_json::to_string(network).unwrap_or_default();
        builder = builder.header(wire::HEADER_NETWORK, json);
    }
    builder.body(Full::new(inv.payload.clone()))
}

/// Unix milliseconds as a header value, without a `String` on the way.
fn millis(ms: u128) -> header::HeaderValue {
    header::HeaderValue::from(u64::try_from(ms).unwrap_or(u64::MAX))
}

async fn response<B: InBody>(shared: &Shared, id: &str, req: Request<B>) -> Response<Full<Bytes>> {
    if let Err(r) = accept_answer(shared, id, &req) {
        return r.into();
    }
    if streaming::is_streamed(req.headers()) {
        return streamed_response(shared, id, req).await;
    }
    let body = match read_body(req, wire::MAX_RESPONSE_BYTES).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return answer_too_large(shared, id, "Response", wire::MAX_RESPONSE_BYTES)
        }
        Err(BodyError::Broken(e)) => return broken_body(&e),
    };
    answer(shared, id, Outcome::Response(body))
}

/// A streamed `/response`: relayed to the invocation's sink as it arrives (see
/// [`streaming`]); it ends as the body does, with its trailers' error (a function
/// error) and the agent's report (measured to the stream's end).
async fn streamed_response<B: InBody>(
    shared: &Shared,
    id: &str,
    req: Request<B>,
) -> Response<Full<Bytes>> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let sink = shared
        .state()
        .in_flight
        .as_ref()
        .and_then(|f| f.stream.clone());
    let (payload, error, report) = match streaming::relay(req.into_body(), sink, content_type).await
    {
        Relayed::Ended {
            payload,
            error,
            report,
        } => (payload, error, report),
        Relayed::TooLarge { limit } => return answer_too_large(shared, id, "Response", limit),
        Relayed::Broken(e) => return broken_body(&e),
    };
    if let Some(report) = report {
        if let Some(f) = shared.state().in_flight.as_mut() {
            f.report = Some(report);
        }
    }
    let outcome = match error {
        None => Outcome::Response(payload),
        Some((error_type, body)) => {
            let (error_type, body) = normalise_error(error_type.as_deref(), body);
            Outcome::FunctionError { error_type, body }
        }
    };
    answer(shared, id, outcome)
}

/// A `/response` or `/error` body past `limit` ([`wire::MAX_RESPONSE_BYTES`], or
/// [`streaming::MAX_STREAMED_BYTES`] for a stream): the runtime gets 413 and the
/// invocation fails at once with `Function.ResponseSizeTooLarge` (the caller does not
/// wait for the function's timeout; what was streamed stays streamed); the environment
/// is kept.
fn answer_too_large(shared: &Shared, id: &str, what: &str, limit: usize) -> Response<Full<Bytes>> {
    let mut state = shared.state();
    if state.check_answer(id).is_ok() {
        state.complete_current(Outcome::Failed {
            error: ErrorBody::new(
                "Function.ResponseSizeTooLarge",
                format!(
                    "{what} payload size exceeded maximum allowed payload size ({limit} bytes)."
                ),
            ),
            reset: false,
        });
    }
    too_large(limit)
}

async fn function_error<B: InBody>(
    shared: &Shared,
    id: &str,
    req: Request<B>,
) -> Response<Full<Bytes>> {
    if let Err(r) = accept_answer(shared, id, &req) {
        return r.into();
    }
    let header_type = error_type_header(&req);
    let body = match read_body(req, wire::MAX_RESPONSE_BYTES).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return answer_too_large(shared, id, "Error", wire::MAX_RESPONSE_BYTES)
        }
        Err(BodyError::Broken(e)) => return broken_body(&e),
    };
    let (error_type, body) = normalise_error(header_type.as_deref(), body);
    answer(shared, id, Outcome::FunctionError { error_type, body })
}

fn answer(shared: &Shared, id: &str, outcome: Outcome) -> Response<Full<Bytes>> {
    let mut state = shared.state();
    // Checked again: the invocation may have timed out while the body was read.
    if let Err(r) = state.check_answer(id) {
        return r.into();
    }
    state.complete_current(outcome);
    accepted()
}

async fn init_error<B: InBody>(shared: &Shared, req: Request<B>) -> Response<Full<Bytes>> {
    let header_type = error_type_header(&req);
    let body = match read_body(req, MAX_SMALL_POST).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return too_large(MAX_SMALL_POST),
        Err(BodyError::Broken(e)) => return broken_body(&e),
    };
    let (error_type, body) = normalise_error(header_type.as_deref(), body);
    tracing::info!(function = %shared.function_name, %error_type, "runtime init error");
    let outcome = Outcome::InitError { error_type, body };
    let mut state = shared.state();
    if state.in_flight.is_some() {
        return error_response(
            StatusCode::FORBIDDEN,
            "InvalidStateTransition",
            "State transition is not allowed: init is over, an invocation is in flight",
        );
    }
    if !state.complete_current(outcome.clone()) {
        state.init_error = Some(outcome);
    }
    accepted()
}

async fn post_logs<B: InBody>(shared: &Shared, req: Request<B>) -> Response<Full<Bytes>> {
    let tagged = req
        .headers()
        .get(wire::HEADER_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match read_body(req, MAX_LOG_POST).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return too_large(MAX_LOG_POST),
        Err(BodyError::Broken(e)) => return broken_body(&e),
    };
    let text = String::from_utf8_lossy(&body);
    let mut state = shared.state();
    let current = state
        .in_flight
        .as_mut()
        .filter(|f| tagged.as_deref().is_none_or(|id| id == f.request_id));
    let mut tail = current.map(|f| &mut f.log);
    for line in text.lines() {
        shared.logs.write(&shared.function_name, line);
        if let Some(tail) = tail.as_deref_mut() {
            tail.push_line(line);
        }
    }
    accepted()
}

/// Checks that `id` may be answered and keeps the invocation report that bootstrap
/// attaches to the result ([`wire::HEADER_INVOCATION_REPORT`]). A report that does not
/// parse is logged and dropped: the result itself still counts.
fn accept_answer<B>(shared: &Shared, id: &str, req: &Request<B>) -> Result<(), Refusal> {
    let arrived = monotonic_ns();
    let report = req
        .headers()
        .get(wire::HEADER_INVOCATION_REPORT)
        .and_then(|v| {
            serde_json::from_slice::<InvocationReport>(v.as_bytes())
                .map_err(
                    |e| tracing::warn!(request_id = id, error = %e, "unreadable invocation report"),
                )
                .ok()
        });
    let mut state = shared.state();
    state.check_answer(id)?;
    if let Some(f) = state.in_flight.as_mut() {
        f.result_ns = Some(arrived);
        if report.is_some() {
            f.report = report;
        }
    }
    Ok(())
}

/// The agent's measure of the runtime's memory during the invocation in flight; one for
/// another invocation (it ended meanwhile) is taken and ignored.
async fn memory_use<B: InBody>(shared: &Shared, req: Request<B>) -> Response<Full<Bytes>> {
    let seen: wire::MemoryUse = match read_json(req).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let mut state = shared.state();
    if let Some(f) = state
        .in_flight
        .as_mut()
        .filter(|f| f.request_id == seen.request_id)
    {
        f.memory_seen_mb = f.memory_seen_mb.max(seen.max_memory_used_mb);
    }
    accepted()
}

async fn runtime_exit<B: InBody>(shared: &Shared, req: Request<B>) -> Response<Full<Bytes>> {
    let mut exit: RuntimeExit = match read_json(req).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let mut state = shared.state();
    let current = state
        .in_flight
        .as_ref()
        .map(|f| f.request_id.clone())
        .or_else(|| {
            state
                .pending
                .as_ref()
                .map(|p| p.invocation.request_id.clone())
        });
    if exit.request_id.is_none() {
        exit.request_id = current;
    }
    let error = exit.to_error();
    tracing::info!(function = %shared.function_name, message = %error.error_message, "runtime exited");
    if let (Some(mb), Some(f)) = (exit.max_memory_used_mb, state.in_flight.as_mut()) {
        // The guest's last measure of the runtime: the failed invocation's REPORT says it.
        let took = Duration::from_nanos(monotonic_ns().saturating_sub(f.handed_ns));
        let report = f.report.get_or_insert_with(|| InvocationReport {
            duration_ms: took.as_secs_f64() * 1000.0,
            ..InvocationReport::default()
        });
        report.max_memory_used_mb = report.max_memory_used_mb.max(mb);
    }
    let outcome = Outcome::Failed { error, reset: true };
    if !state.complete_current(outcome.clone()) {
        // Died during init with nothing waiting: the next invocation learns of it.
        state.init_error = Some(outcome);
    }
    accepted()
}

/// `(Runtime|Function)\.[A-Z][a-zA-Z]+`, the error types Lambda records as given.
pub fn is_valid_error_type(t: &str) -> bool {
    let Some(rest) = t
        .strip_prefix("Runtime.")
        .or_else(|| t.strip_prefix("Function."))
    else {
        return false;
    };
    let mut chars = rest.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && rest.len() >= 2
        && chars.all(|c| c.is_ascii_alphabetic())
}

/// The recorded error type (the header when valid, else the body's `errorType` when
/// valid, else `Runtime.Unknown`) and the JSON the caller gets: the runtime's own body
/// when it is JSON, else an error body built from what was posted.
fn normalise_error(header_type: Option<&str>, body: Bytes) -> (String, Bytes) {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let body_type = parsed
        .as_ref()
        .and_then(|v| v.get("errorType"))
        .and_then(|t| t.as_str())
        .map(str::to_string);
    let error_type = [header_type.map(str::to_string), body_type]
        .into_iter()
        .flatten()
        .find(|t| is_valid_error_type(t))
        .unwrap_or_else(|| "Runtime.Unknown".to_string());
    let body = match parsed {
        Some(v) if v.is_object() => body,
        _ => {
            let message = String::from_utf8_lossy(&body).into_owned();
            Bytes::from(
                serde_json::to_vec(&ErrorBody::new(error_type.clone(), message))
                    .unwrap_or_default(),
            )
        }
    };
    (error_type, body)
}

fn error_type_header<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get(wire::HEADER_FUNCTION_ERROR_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn read_body<B: InBody>(req: Request<B>, limit: usize) -> Result<Bytes, BodyError> {
    body::read_limited(req.into_body(), limit).await
}

async fn read_json<T: serde::de::DeserializeOwned, B: InBody>(
    req: Request<B>,
) -> Result<T, Response<Full<Bytes>>> {
    let body = match read_body(req, MAX_SMALL_POST).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return Err(too_large(MAX_SMALL_POST)),
        Err(BodyError::Broken(e)) => return Err(broken_body(&e)),
    };
    serde_json::from_slice(&body).map_err(|e| {
        error_response(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContent",
            &format!("bad JSON body: {e}"),
        )
    })
}

fn accepted() -> Response<Full<Bytes>> {
    json_body(
        StatusCode::ACCEPTED,
        Bytes::from_static(br#"{"status":"OK"}"#),
    )
}

fn too_large(limit: usize) -> Response<Full<Bytes>> {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
        &format!("Exceeded maximum allowed payload size ({limit} bytes)."),
    )
}

fn broken_body(e: &str) -> Response<Full<Bytes>> {
    error_response(
        StatusCode::BAD_REQUEST,
        "InvalidRequestContent",
        &format!("cannot read the body: {e}"),
    )
}

fn method_not_allowed() -> Response<Full<Bytes>> {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "method not allowed here",
    )
}

/// The Runtime API's error JSON.
fn error_response(status: StatusCode, error_type: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(status, &ErrorBody::new(error_type, message))
}

fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    json_body(
        status,
        Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
    )
}

fn json_body(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_types_are_normalised() {
        for ok in [
            "Runtime.ExitError",
            "Function.ResponseSizeTooLarge",
            "Runtime.Ab",
        ] {
            assert!(is_valid_error_type(ok), "{ok}");
        }
        for bad in [
            "ValueError",
            "Runtime.",
            "Runtime.lower",
            "Runtime.A",
            "Runtime.Has9Digit",
            "Other.Thing",
            "",
        ] {
            assert!(!is_valid_error_type(bad), "{bad}");
        }
        let (t, b) = normalise_error(
            Some("Unhandled"),
            Bytes::from_static(br#"{"errorType":"ValueError","errorMessage":"x"}"#),
        );
        assert_eq!(t, "Runtime.Unknown");
        assert_eq!(&b[..], br#"{"errorType":"ValueError","errorMessage":"x"}"#);
        let (t, _) = normalise_error(Some("Function.Oops"), Bytes::new());
        assert_eq!(t, "Function.Oops");
        let (t, b) = normalise_error(None, Bytes::from_static(b"not json"));
        assert_eq!(t, "Runtime.Unknown");
        let e: ErrorBody = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            (e.error_type.as_str(), e.error_message.as_str()),
            ("Runtime.Unknown", "not json")
        );
    }
}
