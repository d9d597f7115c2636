//! The Invoke API that callers use, shaped like Lambda's:
//! `POST /2015-03-31/functions/{name}/invocations`, `InvokeWithResponseStream` (see
//! [`response_stream`]) and `GET /metrics`. `{name}` is
//! anything Lambda takes there (`name[:qualifier]`, partial and full ARNs, with
//! `?Qualifier=`; see [`crate::names`]): no qualifier or `$LATEST` runs `$LATEST`, a
//! version number that published version, an alias the version it points to now, each in
//! environments of its own. The control plane's paths on the same listener go to
//! [`crate::control_plane`].
//!
//! Limits: a request payload of at most [`MAX_REQUEST_BYTES`] (an `Event` one: at most
//! [`MAX_EVENT_PAYLOAD_BYTES`], read no further), else 413 `RequestEntityTooLargeException`,
//! valid JSON or empty (else 400 `InvalidRequestContentException`, see [`json_payload`]); accepted
//! `Event` invocations bounded per function on disk (else 429 `TooManyRequestsException`,
//! see [`crate::events`]); connections bounded in number and in time spent idle or
//! sending a head (see [`crate::connections`]).

use std::convert::Infallible;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kindling_wire::{monotonic_ns, MAX_REQUEST_BYTES};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::body::{read_charged, BodyError, ChargedError};
use crate::client::InvocationType;
use crate::connections::{self, Activity, Busy, ConnectionLimits, Watched};
use crate::control_plane::{self, ControlPlane};
use crate::environment::Function;
use crate::events::EventQueue;
use crate::hops;
use crate::logs;
use crate::metrics::{self, Metrics};
use crate::names::{self, FunctionRef, NameError};
use crate::scheduler::{until_true, Answer, InvokeError, InvokeRequest, Scheduler, VERSION};
use crate::store::EnqueueError;

mod response_stream;
pub(crate) use response_stream::{whole, AnswerBody, BoxError};

pub const HEADER_INVOCATION_TYPE: &str = "x-amz-invocation-type";
pub const HEADER_LOG_TYPE: &str = "x-amz-log-type";
pub const HEADER_LOG_RESULT: &str = "x-amz-log-result";
pub const HEADER_FUNCTION_ERROR: &str = "x-amz-function-error";
pub const HEADER_EXECUTED_VERSION: &str = "x-amz-executed-version";
pub const HEADER_CLIENT_CONTEXT: &str = "x-amz-client-context";
pub const HEADER_ERROR_TYPE: &str = "x-amzn-errortype";
pub const HEADER_REQUEST_ID: &str = "x-amzn-requestid";
pub const HEADER_TRACE_ID: &str = "x-amzn-trace-id";

/// Largest `Event` payload, as Lambda's asynchronous invocations (1 MB since 2025).
pub const MAX_EVENT_PAYLOAD_BYTES: usize = 1 << 20;

/// How long shutdown waits for answers still being written.
const ANSWER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

const PATH_PREFIX: &str = "/2015-03-31/functions/";
const PATH_SUFFIX: &str = "/invocations";

pub(crate) struct InvokeApi {
    pub scheduler: Arc<Scheduler>,
    pub metrics: Arc<Metrics>,
    pub limits: ConnectionLimits,
    pub events: Arc<EventQueue>,
    pub control: ControlPlane,
    /// Answers carry [`hops::HEADER_HOPS`].
    pub trace_hops: bool,
}

/// Serves callers until `stop` turns true, then lets the answers in progress be written
/// (within [`ANSWER_GRACE`]) and closes every connection.
///
/// At most `max_connections` are served at once: one more is answered 503 and closed
/// (see [`connections::refuse`]), and the server goes on accepting, so that its backlog
/// never fills and the connections it serves are not disturbed.
pub(crate) async fn serve<A: Answering>(
    listener: TcpListener,
    api: Arc<A>,
    mut stop: watch::Receiver<bool>,
) {
    let limits = api.limits();
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let refusing = Arc::new(Semaphore::new(connections::MAX_REFUSING));
    let refusal = connections::refusal(limits.max_connections);
    let mut full = false;
    let mut connections = JoinSet::new();
    // The most connections open at once since memory was last handed back.
    let mut peak = 0;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        if !std::mem::replace(&mut full, true) {
                            tracing::warn!(max = limits.max_connections, "invoke API connections at their limit: refusing new ones");
                        }
                        tracing::debug!(%peer, "connection refused: too many open");
                        if let Ok(permit) = refusing.clone().try_acquire_owned() {
                            let answer = refusal.clone();
                            connections.spawn(async move {
                                connections::refuse(stream, answer).await;
                                drop(permit);
                            });
                        }
                        continue;
                    };
                    full = false;
                    // Delayed ACK meets Nagle otherwise: ~40 ms stalls on split writes.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                    }
                    let api = api.clone();
                    let mut stop = stop.clone();
                    let limits = limits.clone();
                    connections.spawn(async move {
                        let activity = Activity::new();
                        let busy = activity.clone();
                        let service = service_fn(move |req| {
                            let api = api.clone();
                            let busy = busy.busy();
                            async move { Ok::<_, Infallible>(api.answer(req, peer, busy).await) }
                        });
                        let stream = Watched::new(stream, activity.clone());
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service);
                        tokio::pin!(conn);
                        // On stop, the request in progress is still answered (its
                        // invocation has finished by then); idle connections close.
                        let ended = tokio::select! {
                            ended = conn.as_mut() => ended,
                            why = activity.overstayed(&limits) => {
                                tracing::debug!(%peer, why, "closing an invoke API connection");
                                Ok(())
                            }
                            _ = until_true(&mut stop) => {
                                conn.as_mut().graceful_shutdown();
                                conn.await
                            }
                        };
                        if let Err(e) = ended {
                            tracing::debug!(%peer, error = %e, "invoke API connection ended with an error");
                        }
                        drop(slot);
                    });
                    peak = peak.max(connections.len());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "invoke API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {
                if connections.is_empty() && peak >= STORM {
                    peak = 0;
                    tokio::task::spawn_blocking(return_free_memory);
                }
            }
            _ = until_true(&mut stop) => break,
        }
    }
    // Dropping the set would abort answers not yet written: let them finish, within
    // a bound that a stalled client cannot stretch.
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(ANSWER_GRACE, drained).await.is_err() {
        tracing::warn!("invoke API connections still open at shutdown: closing them");
    }
}

/// What a listener served by [`serve`] answers with: the Invoke API, or a function URL.
pub(crate) trait Answering: Send + Sync + 'static {
    fn limits(&self) -> ConnectionLimits;
    /// Answers `req`; `busy` marks the connection busy until it is dropped, which a
    /// streamed answer does when its body ends.
    fn answer(
        &self,
        req: Request<Incoming>,
        peer: std::net::SocketAddr,
        busy: Busy,
    ) -> impl std::future::Future<Output = Response<AnswerBody>> + Send;
}

impl Answering for InvokeApi {
    fn limits(&self) -> ConnectionLimits {
        self.limits.clone()
    }

    fn answer(
        &self,
        req: Request<Incoming>,
        _peer: std::net::SocketAddr,
        busy: Busy,
    ) -> impl std::future::Future<Output = Response<AnswerBody>> + Send {
        self.route(req, busy)
    }
}

/// Connections open at once that make a storm, after which the memory their buffers held
/// is handed back to the kernel once the last one closes.
const STORM: usize = 64;

/// Hands the allocator's free memory back to the kernel: glibc keeps what thousands of
/// connections' buffers used in its arenas otherwise, and the server's RSS would stay at
/// its peak after a connection storm.
fn return_free_memory() {
    // SAFETY: malloc_trim only releases free heap pages; it takes the allocator's own locks.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

impl InvokeApi {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let head_ns = monotonic_ns();
        let path = req.uri().path().to_string();
        if path == "/metrics" {
            return match *req.method() {
                Method::GET => {
                    self.events.observe();
                    let mut r = Response::new(Full::new(Bytes::from(self.metrics.render())));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(metrics::CONTENT_TYPE),
                    );
                    r
                }
                _ => lambda_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowedException",
                    "use GET",
                ),
            };
        }
        if control_plane::handles(&path) {
            return self.control.handle(req).await;
        }
        let Some(name) = path
            .strip_prefix(PATH_PREFIX)
            .and_then(|p| p.strip_suffix(PATH_SUFFIX))
        else {
            return lambda_error(
                StatusCode::NOT_FOUND,
                "UnknownOperationException",
                &format!("Unknown operation: {} {path}", req.method()),
            );
        };
        if req.method() != Method::POST {
            return lambda_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowedException",
                "use POST",
            );
        }
        let function = match names::parse(name, req.uri().query(), self.scheduler.region()) {
            Ok(function) => function,
            Err(e) => return refused_name(&e),
        };
        let (resolved, version) = match self.resolve_named(&function) {
            Ok(found) => found,
            Err(refusal) => return refusal,
        };
        let mut response = self
            .invoke(&resolved.name, &version, &function, req, head_ns)
            .await;
        if let Ok(v) = HeaderValue::from_str(&version) {
            response.headers_mut().insert(HEADER_EXECUTED_VERSION, v);
        }
        response
    }

    /// The function and version a name designates (its qualifier a version, an alias or
    /// none), or the answer that refuses it: 404 for one that does not exist.
    #[expect(
        clippy::result_large_err,
        reason = "the error is the answer itself, sent at once"
    )]
    fn resolve_named(
        &self,
        function: &FunctionRef,
    ) -> Result<(Function, String), Response<Full<Bytes>>> {
        let version = self
            .control
            .store
            .resolve_qualifier(&function.name, function.qualifier.as_deref())
            .map_err(|e| {
                tracing::error!(error = %format!("{e:#}"), "the database failed");
                lambda_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "ServiceException",
                    &format!("the database failed: {e:#}"),
                )
            })?;
        version
            .and_then(|v| Some((self.scheduler.resolve(&function.name, &v)?, v)))
            .ok_or_else(|| {
                let arn = self.scheduler.arn(&function.name);
                not_found(&match &function.qualifier {
                    Some(q) => format!("{arn}:{q}"),
                    None => arn,
                })
            })
    }

    /// Runs (or queues) an invocation of `function` at `version`, which `named` resolved
    /// to.
    async fn invoke(
        &self,
        function: &str,
        version: &str,
        named: &FunctionRef,
        req: Request<Incoming>,
        head_ns: u64,
    ) -> Response<Full<Bytes>> {
        let headers = match InvokeHeaders::parse(req.headers()) {
            Ok(headers) => headers,
            Err(refusal) => return refusal,
        };
        // An Event's payload is read only up to its own, smaller limit: a caller sending
        // many oversize Events at once makes the server hold 1 MiB each, not 6.
        let is_event = matches!(headers.invocation_type, InvocationType::Event);
        let (limit, declared) = match is_event {
            true => (MAX_EVENT_PAYLOAD_BYTES, content_length(&req)),
            false => (MAX_REQUEST_BYTES, None),
        };
        let payload = match read_body(req, &self.limits, limit, Some("InvokeFunction")).await {
            Ok(p) => p,
            Err(r) if is_event && r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return event_too_large(declared)
            }
            Err(r) => return r,
        };
        let payload = match json_payload(payload) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let body_ns = monotonic_ns();
        let request = InvokeRequest {
            payload,
            client_context: headers.client_context,
            cognito_identity: None,
            trace_id: headers.trace_id,
            request_id: None,
            // `$LATEST` named or not, the function sees its unqualified ARN.
            qualifier: named.qualifier.clone().filter(|q| q != VERSION),
        };
        match headers.invocation_type {
            InvocationType::DryRun => status_only(StatusCode::NO_CONTENT),
            InvocationType::Event => {
                let qualifier = named.qualifier.as_deref().filter(|q| *q != VERSION);
                self.queue_event(function, qualifier, request).await
            }
            InvocationType::RequestResponse => {
                match self
                    .scheduler
                    .invoke(function, version, request, false)
                    .await
                {
                    Ok(invoked) => {
                        let hops = invoked
                            .stamps
                            .filter(|_| self.trace_hops)
                            .map(|s| s.header(head_ns, body_ns, monotonic_ns()));
                        let mut r = rendered(invoked, headers.tail);
                        if let Some(v) = hops.and_then(|h| HeaderValue::from_str(&h).ok()) {
                            r.headers_mut().insert(hops::HEADER_HOPS, v);
                        }
                        r
                    }
                    Err(e) => self.refused(e),
                }
            }
        }
    }

    /// Accepts an Event invocation: written to the database (so it survives a crash),
    /// within the function's bounds on queued events, then 202; the queue runs it.
    async fn queue_event(
        &self,
        function: &str,
        qualifier: Option<&str>,
        request: InvokeRequest,
    ) -> Response<Full<Bytes>> {
        if request.payload.len() > MAX_EVENT_PAYLOAD_BYTES {
            return event_too_large(Some(request.payload.len()));
        }
        match self.events.accept(function, qualifier, &request).await {
            Ok(request_id) => {
                let mut r = status_only(StatusCode::ACCEPTED);
                if let Ok(id) = HeaderValue::from_str(&request_id) {
                    r.headers_mut().insert(HEADER_REQUEST_ID, id);
                }
                r
            }
            Err(e @ EnqueueError::Full { .. }) => {
                too_many_requests(&e.to_string(), "FunctionInvocationRateLimitExceeded")
            }
            Err(EnqueueError::Store(e)) => {
                tracing::error!(%function, error = %format!("{e:#}"), "cannot queue an event");
                lambda_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "ServiceException",
                    &format!("the event could not be queued: {e:#}"),
                )
            }
        }
    }

    /// The answer to an invocation that could not be run.
    fn refused(&self, e: InvokeError) -> Response<Full<Bytes>> {
        match e {
            InvokeError::NotFound(n) => not_found(&self.scheduler.arn(&n)),
            InvokeError::TooManyRequests(_) => too_many_requests(
                &e.to_string(),
                "ReservedFunctionConcurrentInvocationLimitExceeded",
            ),
            InvokeError::ShuttingDown => lambda_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceException",
                &e.to_string(),
            ),
            // The message names the launcher's error chain, down to its root cause.
            InvokeError::Environment { .. } => lambda_error(
                StatusCode::BAD_GATEWAY,
                "ServiceException",
                &format!("{:#}", anyhow::Error::new(e)),
            ),
        }
    }
}

/// Lambda's throttling answer: 429 `TooManyRequestsException` with its `Reason`.
fn too_many_requests(message: &str, reason: &str) -> Response<Full<Bytes>> {
    let mut r = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        &json!({"Type": "User", "message": message, "Reason": reason}),
    );
    r.headers_mut().insert(
        HEADER_ERROR_TYPE,
        HeaderValue::from_static("TooManyRequestsException"),
    );
    r
}

/// Lambda's answer to an Event payload past [`MAX_EVENT_PAYLOAD_BYTES`], naming its size
/// where the caller declared it.
fn event_too_large(bytes: Option<usize>) -> Response<Full<Bytes>> {
    let size = match bytes {
        Some(bytes) => format!("{bytes} byte"),
        None => format!("more than {MAX_EVENT_PAYLOAD_BYTES} bytes of"),
    };
    lambda_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLargeException",
        &format!("{size} payload is too large for the Event invocation type (limit {MAX_EVENT_PAYLOAD_BYTES} bytes)"),
    )
}

/// The request's `Content-Length`, when it has a valid one.
fn content_length(req: &Request<Incoming>) -> Option<usize> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// `X-Amz-Client-Context` is base64 JSON; the runtime gets the JSON.
fn decode_client_context(v: &HeaderValue) -> Result<String, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.as_bytes())
        .map_err(|e| format!("X-Amz-Client-Context is not base64: {e}"))?;
    let text =
        String::from_utf8(bytes).map_err(|_| "X-Amz-Client-Context is not UTF-8".to_string())?;
    // It travels on as a header of /next.
    HeaderValue::from_str(&text)
        .map_err(|_| "X-Amz-Client-Context holds control characters".to_string())?;
    Ok(text)
}

/// A caller's request body, at most `limit` bytes, all of it within the limits' body
/// timeout (a body that trickles in would otherwise hold its connection for as long as the
/// caller likes) and within the budget of bodies the server holds at once (past it: 429
/// `TooManyRequestsException`, Lambda's throttling answer, and the connection closed).
/// A longer body is 413 `RequestEntityTooLargeException` with Lambda's message, which
/// names the API `operation` where there is one (`InvokeFunction`).
pub(crate) async fn read_body(
    req: Request<Incoming>,
    limits: &ConnectionLimits,
    limit: usize,
    operation: Option<&str>,
) -> Result<Bytes, Response<Full<Bytes>>> {
    let timeout = limits.body_read_timeout;
    let too_large = || {
        let mut message = format!("Request must be smaller than {limit} bytes");
        if let Some(operation) = operation {
            message.push_str(&format!(" for the {operation} operation"));
        }
        lambda_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLargeException",
            &message,
        )
    };
    let reading = read_charged(req.into_body(), limit, &limits.bodies);
    let Ok(read) = tokio::time::timeout(timeout, reading).await else {
        let mut r = lambda_error(
            StatusCode::REQUEST_TIMEOUT,
            "RequestTimeoutException",
            &format!("the request body did not arrive within {timeout:?}"),
        );
        // The rest of the body may still come: the connection cannot carry another request.
        r.headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        return Err(r);
    };
    match read {
        Ok(payload) => Ok(payload),
        Err(ChargedError::Body(BodyError::TooLarge)) => Err(too_large()),
        Err(ChargedError::OverBudget) => {
            tracing::warn!("callers' request bodies at the server's budget: refusing one");
            let mut r = lambda_error(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequestsException",
                "Rate Exceeded.",
            );
            // The rest of the body was not read.
            r.headers_mut()
                .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            Err(r)
        }
        Err(ChargedError::Body(BodyError::Broken(e))) => Err(lambda_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            &format!("cannot read the request body: {e}"),
        )),
    }
}

/// Lambda's check of an invocation's payload, before any environment is touched: JSON
/// (checked without building it), or nothing, which the function sees as `{}`; else 400
/// `InvalidRequestContentException` with Lambda's message.
#[expect(
    clippy::result_large_err,
    reason = "the error is the answer itself, sent at once"
)]
pub(crate) fn json_payload(payload: Bytes) -> Result<Bytes, Response<Full<Bytes>>> {
    if payload.is_empty() {
        return Ok(Bytes::from_static(b"{}"));
    }
    // A slice reader skips strings without checking their UTF-8: check it first.
    let checked = std::str::from_utf8(&payload)
        .map_err(|e| e.to_string())
        .and_then(|text| {
            serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| e.to_string())
        });
    match checked {
        Ok(_) => Ok(payload),
        Err(why) => Err(lambda_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            &format!(
                "Could not parse request body into json: Could not parse payload into json: {why}"
            ),
        )),
    }
}

/// What an Invoke request's headers ask for.
struct InvokeHeaders {
    invocation_type: InvocationType,
    /// `X-Amz-Log-Type: Tail`: the log's end rides on the answer.
    tail: bool,
    client_context: Option<String>,
    trace_id: Option<String>,
}

impl InvokeHeaders {
    /// Reads the headers, or the 400 answer that names the bad one.
    #[expect(
        clippy::result_large_err,
        reason = "the error is the answer itself, sent at once"
    )]
    fn parse(headers: &http::HeaderMap) -> Result<Self, Response<Full<Bytes>>> {
        let text = |h: &str| headers.get(h).map(|v| v.to_str().map(str::to_string));
        let bad = |message: &str| {
            lambda_error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterValueException",
                message,
            )
        };
        let invocation_type = match text(HEADER_INVOCATION_TYPE).map(|t| t.ok()?.parse().ok()) {
            None => InvocationType::default(),
            Some(Some(t)) => t,
            Some(None) => {
                return Err(bad(
                    "X-Amz-Invocation-Type must be RequestResponse, Event or DryRun",
                ))
            }
        };
        let tail = match text(HEADER_LOG_TYPE) {
            None => false,
            Some(Ok(t)) if t == "Tail" => true,
            Some(Ok(t)) if t == "None" => false,
            Some(_) => return Err(bad("X-Amz-Log-Type must be None or Tail")),
        };
        let client_context = match headers.get(HEADER_CLIENT_CONTEXT) {
            None => None,
            Some(v) => Some(decode_client_context(v).map_err(|e| {
                lambda_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestContentException",
                    &e,
                )
            })?),
        };
        let trace_id = headers
            .get(HEADER_TRACE_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(InvokeHeaders {
            invocation_type,
            tail,
            client_context,
            trace_id,
        })
    }
}

/// A finished invocation as Lambda answers it: the function's response or error body,
/// its request id, `X-Amz-Function-Error` and, when asked, the log's tail.
fn rendered(invoked: crate::scheduler::Invoked, tail: bool) -> Response<Full<Bytes>> {
    let (body, error) = match invoked.answer {
        Answer::Response(body) => (body, false),
        Answer::Error { body, .. } => (body, true),
    };
    let mut r = Response::new(Full::new(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(id) = HeaderValue::from_str(&invoked.request_id) {
        h.insert(HEADER_REQUEST_ID, id);
    }
    if error {
        h.insert(HEADER_FUNCTION_ERROR, HeaderValue::from_static("Unhandled"));
    }
    if tail {
        let encoded = base64::engine::general_purpose::STANDARD.encode(logs::tail(&invoked.log));
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            h.insert(HEADER_LOG_RESULT, v);
        }
    }
    r
}

/// Lambda's 404 for a function, version or alias that does not exist; unlike its other
/// errors, this one spells the body's key `Message`.
fn not_found(arn: &str) -> Response<Full<Bytes>> {
    resource_not_found(&format!("Function not found: {arn}"))
}

fn resource_not_found(message: &str) -> Response<Full<Bytes>> {
    let mut r = json_response(
        StatusCode::NOT_FOUND,
        &json!({"Type": "User", "Message": message}),
    );
    r.headers_mut().insert(
        HEADER_ERROR_TYPE,
        HeaderValue::from_static("ResourceNotFoundException"),
    );
    r
}

/// The answer to a name Lambda would refuse before looking it up.
fn refused_name(e: &NameError) -> Response<Full<Bytes>> {
    let message = e.message();
    match e {
        // Lambda's request validation answers `{"message"}` alone.
        NameError::Invalid(_) => {
            let mut r = json_response(StatusCode::BAD_REQUEST, &json!({"message": message}));
            r.headers_mut().insert(
                HEADER_ERROR_TYPE,
                HeaderValue::from_static("ValidationException"),
            );
            r
        }
        NameError::QualifierConflict => lambda_error(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValueException",
            &message,
        ),
        NameError::OtherRegion { .. } => resource_not_found(&message),
    }
}

/// Lambda's error answer: the type in `X-Amzn-ErrorType`, `{"Type","message"}` in the body.
pub(crate) fn lambda_error(
    status: StatusCode,
    error_type: &'static str,
    message: &str,
) -> Response<Full<Bytes>> {
    let mut r = json_response(status, &json!({"Type": "User", "message": message}));
    r.headers_mut()
        .insert(HEADER_ERROR_TYPE, HeaderValue::from_static(error_type));
    r
}

pub(crate) fn json_response(
    status: StatusCode,
    value: &serde_json::Value,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn status_only(status: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_must_be_json_or_nothing() {
        assert_eq!(json_payload(Bytes::new()).unwrap(), &b"{}"[..]);
        for good in [
            &br#"{"a":[1,2,{"b":null}]}"#[..],
            b"\"text\"",
            b" 42 ",
            b"null",
        ] {
            assert_eq!(json_payload(Bytes::from_static(good)).unwrap(), good);
        }
        for bad in [
            &b"not json"[..],
            b"{\"a\": ",
            b"{} {}",
            b"\"\xff\"",
            b"  ",
            b"{\"a\":1,}",
        ] {
            let refused = json_payload(Bytes::from_static(bad)).unwrap_err();
            assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{bad:?}");
            assert_eq!(
                refused.headers()[HEADER_ERROR_TYPE],
                "InvalidRequestContentException"
            );
        }
        // What it costs, for the README: a 6 MB payload, checked.
        let big = Bytes::from(
            serde_json::to_vec(
                &json!({"rows": vec![json!({"id": 12345, "name": "kindling"}); 200_000]}),
            )
            .unwrap(),
        );
        let begun = std::time::Instant::now();
        json_payload(big.clone()).unwrap();
        println!("{} bytes checked in {:?}", big.len(), begun.elapsed());
    }
}
