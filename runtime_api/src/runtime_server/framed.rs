//! The host's end of the agent's frame stream ([`kindling_wire::frame`]): each request
//! frame is served by the same handler as an HTTP request, and its answer goes back as
//! one frame as soon as it is ready, in whatever order the calls finish (a `/next` waits
//! for its event while the result and log posts around it are answered).

use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::header::{HeaderValue, CONNECTION, UPGRADE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use kindling_wire::frame::{Frame, FrameReader, FrameWriter, PROTOCOL};
use kindling_wire::PATH_STREAM;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{handle, Shared};

/// Calls one stream may have open at once: an agent has a `/next`, a result and a few
/// posts (logs, extensions) in flight; past this, the host stops reading until one ends.
const MAX_CALLS: usize = 32;

/// Whether `req` asks to turn its connection into a frame stream.
pub(super) fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET
        && req.uri().path() == PATH_STREAM
        && req
            .headers()
            .get(UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(PROTOCOL.as_bytes()))
}

/// The answer that grants the upgrade.
pub(super) fn switching() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(UPGRADE, HeaderValue::from_static(PROTOCOL));
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    resp
}

/// Serves one stream until the agent closes it or breaks the framing. Calls still open
/// then are dropped with it: a `/next` that had not taken its event leaves it for the
/// next one.
pub(super) async fn serve(shared: &Shared, io: impl AsyncRead + AsyncWrite) {
    shared.exchanges.streams.fetch_add(1, Ordering::Relaxed);
    let (reader, writer) = tokio::io::split(io);
    let mut reader = FrameReader::new(reader);
    let mut writer = FrameWriter::new(writer);
    let mut calls = FuturesUnordered::new();
    loop {
        tokio::select! {
            frame = reader.next(), if calls.len() < MAX_CALLS => match frame {
                Ok(Some(Frame::Request { seq, request })) => {
                    shared.exchanges.framed.fetch_add(1, Ordering::Relaxed);
                    calls.push(async move {
                        (seq, handle(shared, request.map(Full::new)).await)
                    });
                }
                Ok(Some(Frame::Response { .. })) => {
                    tracing::debug!("frame stream: the agent sent an answer; closing it");
                    return;
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "frame stream ended");
                    return;
                }
            },
            Some((seq, response)) = calls.next(), if !calls.is_empty() => {
                let (parts, body) = response.into_parts();
                let body: Bytes = match body.collect().await {
                    Ok(collected) => collected.to_bytes(),
                    Err(never) => match never {},
                };
                let response = Response::from_parts(parts, body);
                if let Err(e) = writer.send(&Frame::Response { seq, response }).await {
                    tracing::debug!(error = %e, "frame stream: cannot answer");
                    return;
                }
            }
        }
    }
}
