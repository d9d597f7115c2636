//! The public Lambda Runtime API inside the guest: every call is relayed to the host
//! unchanged (method, path, headers, status, body), with the agent told about the steps
//! it measures. A call whose body is whole and small (`/next`, most results, the rest)
//! goes as one frame on the agent's stream to the host; a streamed or large body is
//! streamed through over HTTP ([`crate::upstream`]). The Extensions, Telemetry and Logs APIs share the port
//! and are served here ([`crate::extensions`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::channel::Channel;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::header::{
    HeaderMap, HeaderValue, CONNECTION, CONTENT_TYPE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kindling_wire::{
    deadline_on_guest_clock, from_hex, monotonic_ns, ErrorBody, GuestNetwork, InvocationReport,
    HEADER_DEADLINE_MS, HEADER_ENTROPY, HEADER_FUNCTION_ERROR_TYPE, HEADER_HOST_TIME_MS,
    HEADER_INVOCATION_REPORT, HEADER_NETWORK, HEADER_REQUEST_ID, HEADER_RESPONSE_MODE, PATH_NEXT,
    RUNTIME_PREFIX,
};
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};
use tokio::net::TcpListener;

use crate::agent::Agent;

/// How far the guest's clock may stray from the host's before it is stepped: below the
/// transfer time of an event, stepping would only add noise.
const CLOCK_SLACK_MS: u128 = 20;
/// Largest result body read whole before it is relayed (see [`forward_whole`]).
const ONE_WRITE_BYTES: u64 = 64 << 10;
/// Frames of a streamed response that may wait for the host.
const STREAM_DEPTH: usize = 4;
/// The trailers a relayed stream may carry: the runtime's error, and our report.
const STREAM_TRAILERS: &str =
    "lambda-runtime-function-error-type, lambda-runtime-function-error-body, kindling-invocation-report";
use crate::upstream::{full, Backoff, Body, BoxError};

/// Accepts the runtime's connections until the process ends.
pub async fn serve(listener: TcpListener, agent: Arc<Agent>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                say!("accept: {e}");
                continue;
            }
        };
        // Runtimes often write a request's head and body separately: without NODELAY on
        // both ends, delayed ACK meets Nagle and each call stalls ~40 ms.
        if let Err(e) = stream.set_nodelay(true) {
            say!("TCP_NODELAY: {e}");
        }
        let agent = agent.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(agent.clone(), req));
            // Errors here are the runtime hanging up mid-request; nothing to report.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The calls the agent takes part in.
enum Route {
    Next,
    Result(String),
    Other,
}

impl Route {
    fn of(method: &Method, path: &str) -> Route {
        if method == Method::GET && path == PATH_NEXT {
            return Route::Next;
        }
        let result_id = path
            .strip_prefix(RUNTIME_PREFIX)
            .and_then(|p| p.strip_prefix("/invocation/"))
            .and_then(|p| {
                p.strip_suffix("/response")
                    .or_else(|| p.strip_suffix("/error"))
            })
            .filter(|id| !id.is_empty() && !id.contains('/'));
        match result_id {
            Some(id) if method == Method::POST => Route::Result(id.to_owned()),
            _ => Route::Other,
        }
    }
}

async fn handle(
    agent: Arc<Agent>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if crate::extensions::owns(req.uri().path()) {
        return Ok(crate::extensions::handle(&agent, req).await);
    }
    match Route::of(req.method(), req.uri().path()) {
        Route::Next => return Ok(next(&agent, req).await),
        Route::Result(id) => {
            let arrived = monotonic_ns();
            // Only ours: a runtime cannot pass off a report of its own.
            req.headers_mut().remove(HEADER_INVOCATION_REPORT);
            if is_streamed(req.headers()) {
                let req = streamed(agent.clone(), id, req);
                return Ok(forward(&agent, req).await);
            }
            let failed = req.uri().path().ends_with("/error");
            if let Some(report) = agent.result_received(&id, failed, arrived).await {
                req.headers_mut()
                    .insert(HEADER_INVOCATION_REPORT, report_value(&report));
            }
        }
        Route::Other => {}
    }
    if req
        .body()
        .size_hint()
        .exact()
        .is_some_and(|n| n <= ONE_WRITE_BYTES)
    {
        return Ok(forward_whole(&agent, req).await);
    }
    Ok(forward(&agent, req.map(|b| b.map_err(Into::into).boxed())).await)
}

/// A request whose body is known to be small (at most [`ONE_WRITE_BYTES`]) is read whole
/// and goes to the host as one frame (or in one write, over HTTP): the host then wakes
/// once for it, not once per part the runtime wrote.
async fn forward_whole(agent: &Agent, req: Request<Incoming>) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        // The runtime hung up mid-body: the host never hears of this request, as when the
        // broken body was relayed.
        Err(e) => {
            let body = ErrorBody::new(
                "InvalidRequestContent",
                format!("cannot read the body: {e}"),
            );
            return json_answer(StatusCode::BAD_REQUEST, &body);
        }
    };
    strip_hop_by_hop(&mut parts.headers);
    let what = format!("{} {}", parts.method, parts.uri.path());
    match agent
        .upstream
        .exchange(Request::from_parts(parts, body))
        .await
    {
        Ok(resp) => relay_response(resp),
        Err(e) => host_unavailable(&what, &e),
    }
}

fn json_answer(status: StatusCode, body: &ErrorBody) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(full(serde_json::to_vec(body).expect("serialisable")))
        .expect("valid response")
}

/// The host could not be reached: 500 tells a runtime that its environment is broken
/// and it should exit.
fn host_unavailable(what: &str, e: &dyn std::fmt::Display) -> Response<Body> {
    say!("{what}: {e}");
    let body = ErrorBody::new("Kindling.HostUnavailable", format!("{what}: {e}"));
    json_answer(StatusCode::INTERNAL_SERVER_ERROR, &body)
}

fn is_streamed(headers: &HeaderMap) -> bool {
    headers
        .get(HEADER_RESPONSE_MODE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"streaming"))
}

/// A streamed `/response`, relayed frame by frame as the runtime writes it (a bounded
/// channel: a slow host holds the runtime back, never memory). Its trailers are declared
/// (hyper sends only declared ones, and runtimes such as Node's do not declare theirs),
/// and when the stream ends the invocation's report joins them: its duration covers
/// the whole stream.
fn streamed(agent: Arc<Agent>, id: String, req: Request<Incoming>) -> Request<Body> {
    let (mut parts, mut body) = req.into_parts();
    parts.headers.remove(TRAILER);
    parts
        .headers
        .insert(TRAILER, HeaderValue::from_static(STREAM_TRAILERS));
    let (mut tx, channel) = Channel::<Bytes, BoxError>::new(STREAM_DEPTH);
    tokio::spawn(async move {
        let mut trailers = HeaderMap::new();
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) => {
                    say!("streamed response of {id}: {e}");
                    tx.abort(e.into());
                    return;
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    if tx.send_data(data).await.is_err() {
                        return; // the host hung up; the runtime's post fails
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers.extend(t);
                    }
                }
            }
        }
        trailers.remove(HEADER_INVOCATION_REPORT);
        let failed = trailers.contains_key(HEADER_FUNCTION_ERROR_TYPE);
        if let Some(report) = agent.result_received(&id, failed, monotonic_ns()).await {
            trailers.insert(HEADER_INVOCATION_REPORT, report_value(&report));
        }
        let _ = tx.send_trailers(trailers).await;
    });
    Request::from_parts(parts, channel.boxed())
}

fn report_value(report: &InvocationReport) -> HeaderValue {
    let json = serde_json::to_vec(report).expect("a report serialises");
    HeaderValue::from_bytes(&json).expect("JSON without control characters")
}

/// `/next` blocks on the host for as long as it takes; it has no body, so a connection
/// lost to a host restart, or reset under it when a snapshot of this VM is taken (in the
/// VM that took it and in every clone), is simply retried, as is a `/next` the host
/// dropped as stale (503): the runtime never notices.
async fn next(agent: &Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    agent.next_requested().await;
    let (mut parts, _) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let mut backoff = Backoff::new();
    let resp = loop {
        let attempt = Request::from_parts(parts.clone(), Bytes::new());
        match agent.upstream.exchange(attempt).await {
            Ok(resp) if resp.status() == StatusCode::SERVICE_UNAVAILABLE => {
                say!("GET /next: the host dropped it (connections reset); asking again");
            }
            Ok(resp) => break resp,
            Err(e) => {
                say!("GET /next: {e}; retrying");
                backoff.wait().await;
            }
        }
    };
    let mut resp = resp;
    reseed_from_host(resp.headers_mut(), agent.in_microvm);
    readdress_from_host(resp.headers_mut(), agent.in_microvm).await;
    onto_guest_clock(resp.headers_mut(), agent.in_microvm);
    if resp.status().is_success() {
        match resp
            .headers()
            .get(HEADER_REQUEST_ID)
            .map(HeaderValue::to_str)
        {
            Some(Ok(id)) => {
                agent.event_handed_over(id, resp.headers());
                agent.report_memory_while_running(id);
            }
            _ => say!("event from the host without a request id"),
        }
    }
    relay_response(resp)
}

async fn forward(agent: &Agent, mut req: Request<Body>) -> Response<Body> {
    let what = format!("{} {}", req.method(), req.uri().path());
    strip_hop_by_hop(req.headers_mut());
    match agent.upstream.send(req).await {
        Ok(resp) => relay_response(resp.map(|b| b.map_err(Into::into).boxed())),
        Err(e) => host_unavailable(&what, &e),
    }
}

/// Feeds the host's [`HEADER_ENTROPY`] (SnapStart) to the kernel's random generator and
/// drops the header, before the runtime sees the event. Only a microVM's kernel is ours
/// to reseed (`in_microvm`): a sandbox shares the host's.
fn reseed_from_host(headers: &mut HeaderMap, in_microvm: bool) {
    let Some(entropy) = headers.remove(HEADER_ENTROPY) else {
        return;
    };
    if !in_microvm {
        return;
    }
    let bytes = entropy.to_str().ok().and_then(from_hex);
    let done = bytes
        .ok_or_else(|| "not hex".to_string())
        .and_then(|bytes| crate::entropy::reseed(&bytes));
    match done {
        Ok(()) => say!("kernel random generator reseeded with entropy from the host"),
        Err(e) => say!("cannot reseed the kernel random generator: {e}"),
    }
}

/// Moves a restored guest onto its own network lease ([`HEADER_NETWORK`], SnapStart) and
/// drops the header, before the runtime sees the event. Only a microVM's interface is
/// ours to configure.
async fn readdress_from_host(headers: &mut HeaderMap, in_microvm: bool) {
    let Some(network) = headers.remove(HEADER_NETWORK) else {
        return;
    };
    if !in_microvm {
        return;
    }
    let net = match serde_json::from_slice::<GuestNetwork>(network.as_bytes()) {
        Ok(net) => net,
        Err(e) => return say!("the host's network is not one: {e}"),
    };
    match crate::network::readdress(&net).await {
        Ok(()) => say!(
            "network: {} {}/{} via {} (from the host)",
            net.interface,
            net.address,
            net.prefix,
            net.gateway
        ),
        Err(e) => say!("cannot move {} onto its lease: {e}", net.interface),
    }
}

/// Moves the event's deadline from the host's clock onto ours (see
/// [`kindling_wire::HEADER_HOST_TIME_MS`]); when the clock is ours, first sets it to the
/// host's, so that handlers read the right time too.
fn onto_guest_clock(headers: &mut HeaderMap, owns_clock: bool) {
    let Some(host_now) = headers.remove(HEADER_HOST_TIME_MS) else {
        return;
    };
    let number = |v: &HeaderValue| v.to_str().ok()?.parse::<u64>().ok();
    let (Some(host_now), Some(deadline)) = (
        number(&host_now),
        headers.get(HEADER_DEADLINE_MS).and_then(number),
    ) else {
        return;
    };
    if owns_clock {
        follow_host_clock(host_now);
    }
    let guest_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let guest_now = u64::try_from(guest_now).unwrap_or(u64::MAX);
    let moved = deadline_on_guest_clock(deadline, host_now, guest_now);
    headers.insert(HEADER_DEADLINE_MS, HeaderValue::from(moved));
}

/// Steps the clock to the host's when they differ by more than [`CLOCK_SLACK_MS`].
fn follow_host_clock(host_now_ms: u64) {
    let guest_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // Milliseconds since 1970 fit an i128 with room to spare: saturate rather than wrap.
    let guest_now_ms = i128::try_from(guest_now.as_millis()).unwrap_or(i128::MAX);
    let skew = i128::from(host_now_ms) - guest_now_ms;
    if skew.unsigned_abs() <= CLOCK_SLACK_MS {
        return;
    }
    let host_now = TimeSpec::from(Duration::from_millis(host_now_ms));
    match clock_settime(ClockId::CLOCK_REALTIME, host_now) {
        Ok(()) => say!("clock set to the host's ({skew:+} ms)"),
        Err(e) => say!("cannot set the clock to the host's ({skew:+} ms): {e}"),
    }
}

fn relay_response(mut resp: Response<Body>) -> Response<Body> {
    strip_hop_by_hop(resp.headers_mut());
    resp
}

/// Headers of one hop: hyper frames each side itself (the body's length is kept, so a
/// Content-Length still passes through).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_the_calls_the_agent_measures() {
        assert!(matches!(Route::of(&Method::GET, PATH_NEXT), Route::Next));
        let resp = "/2018-06-01/runtime/invocation/abc-1/response";
        assert!(matches!(Route::of(&Method::POST, resp), Route::Result(id) if id == "abc-1"));
        let err = "/2018-06-01/runtime/invocation/abc-1/error";
        assert!(matches!(Route::of(&Method::POST, err), Route::Result(id) if id == "abc-1"));
        assert!(matches!(Route::of(&Method::GET, resp), Route::Other));
        let nested = "/2018-06-01/runtime/invocation/a/b/response";
        assert!(matches!(Route::of(&Method::POST, nested), Route::Other));
        assert!(matches!(
            Route::of(&Method::POST, "/2018-06-01/runtime/init/error"),
            Route::Other
        ));
    }
}
