//! Response streaming (`Lambda-Runtime-Function-Response-Mode: streaming`): a runtime's
//! `/response` body is carried to the caller chunk by chunk, as it arrives.
//!
//! The Runtime API reads a streamed body with [`relay`]: each data frame goes to the
//! invocation's [`StreamSink`] (a bounded channel: when the caller reads slowly the
//! function's writes wait, memory never grows), or, when its caller cannot take a
//! stream (a plain `Invoke`), is gathered into one payload of at most
//! [`wire::MAX_RESPONSE_BYTES`]. A stream may carry at most [`MAX_STREAMED_BYTES`]
//! (Lambda's 20 MB).
//!
//! A failure in mid-stream arrives as the trailers `Lambda-Runtime-Function-Error-Type`
//! and `Lambda-Runtime-Function-Error-Body` (base64 JSON), or, from runtimes that cannot
//! send trailers (AWS's `lambda_runtime` crate), as those two lines written as the
//! stream's last data: a last frame of that shape is taken as the error, not as data.

use std::sync::Arc;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt;
use kindling_wire::{self as wire, InvocationReport};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::body::InBody;
use crate::scheduler::{InvokeError, InvokeRequest, Invoked, Scheduler};

/// The content type of a response with an HTTP prelude (JSON, 8 NUL bytes, the body).
pub const HTTP_INTEGRATION_CONTENT_TYPE: &str =
    "application/vnd.awslambda.http-integration-response";
/// Most bytes one streamed response may carry (Lambda's 20 MB).
pub const MAX_STREAMED_BYTES: usize = 20 * 1024 * 1024;
/// Chunks that may wait between the function and a slow caller; each is at most one
/// read of the guest's connection (hyper's buffer), so what waits stays bounded.
const SINK_DEPTH: usize = 8;

/// What a streamed response sends its caller.
#[derive(Debug)]
pub enum StreamEvent {
    /// The runtime began its streamed `/response`, with this content type.
    Start { content_type: Option<String> },
    /// The next bytes of the payload.
    Chunk(Bytes),
}

/// Where a streamed response goes, chunk by chunk.
pub type StreamSink = mpsc::Sender<StreamEvent>;

/// A sink and the receiver its caller reads.
pub fn channel() -> (StreamSink, mpsc::Receiver<StreamEvent>) {
    mpsc::channel(SINK_DEPTH)
}

/// Whether a `/response` is streamed.
pub fn is_streamed(headers: &HeaderMap) -> bool {
    headers
        .get(wire::HEADER_RESPONSE_MODE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"streaming"))
}

/// How a streamed body ended.
pub(crate) enum Relayed {
    /// All of it was read. `payload` holds it when there was no sink (else it went
    /// there); `error` is a mid-stream failure (its type as sent, its JSON body).
    Ended {
        payload: Bytes,
        error: Option<(Option<String>, Bytes)>,
        report: Option<InvocationReport>,
    },
    /// Past `limit` bytes.
    TooLarge { limit: usize },
    /// The runtime's connection broke mid-body.
    Broken(String),
}

/// Reads a streamed `/response` body to its end, handing each chunk to `sink` as it
/// arrives (see the module's doc). A sink whose caller went away is dropped: the rest
/// is read and discarded, so that the function still finishes.
pub(crate) async fn relay(
    mut body: impl InBody,
    mut sink: Option<StreamSink>,
    content_type: Option<String>,
) -> Relayed {
    let limit = if sink.is_some() {
        MAX_STREAMED_BYTES
    } else {
        wire::MAX_RESPONSE_BYTES
    };
    if let Some(s) = &sink {
        if s.send(StreamEvent::Start { content_type }).await.is_err() {
            sink = None;
        }
    }
    let mut gathered = BytesMut::new();
    let mut seen = 0usize;
    // A frame that looks like in-body error lines: data unless it turns out to be last.
    let mut held: Option<Bytes> = None;
    let mut trailers = HeaderMap::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => return Relayed::Broken(e.to_string()),
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers.extend(t);
                }
                continue;
            }
        };
        seen = seen.saturating_add(data.len());
        if seen > limit {
            return Relayed::TooLarge { limit };
        }
        if let Some(earlier) = held.take() {
            deliver(&mut sink, &mut gathered, earlier).await;
        }
        if in_body_error(&data).is_some() {
            held = Some(data);
        } else {
            deliver(&mut sink, &mut gathered, data).await;
        }
    }
    let mut error = error_of(&trailers);
    if let Some(last) = held {
        match in_body_error(&last) {
            Some(e) if error.is_none() => error = Some(e),
            _ => deliver(&mut sink, &mut gathered, last).await,
        }
    }
    let report = trailers
        .get(wire::HEADER_INVOCATION_REPORT)
        .and_then(|v| serde_json::from_slice(v.as_bytes()).ok());
    Relayed::Ended {
        payload: gathered.freeze(),
        error,
        report,
    }
}

async fn deliver(sink: &mut Option<StreamSink>, gathered: &mut BytesMut, chunk: Bytes) {
    match sink {
        Some(s) => {
            if s.send(StreamEvent::Chunk(chunk)).await.is_err() {
                *sink = None;
            }
        }
        None => gathered.extend_from_slice(&chunk),
    }
}

/// The error the trailers carry: its type and its decoded body.
fn error_of(trailers: &HeaderMap) -> Option<(Option<String>, Bytes)> {
    let error_type = trailers
        .get(wire::HEADER_FUNCTION_ERROR_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = trailers
        .get(wire::HEADER_FUNCTION_ERROR_BODY)
        .map(|v| decode_body(v.as_bytes()));
    if error_type.is_none() && body.is_none() {
        return None;
    }
    Some((error_type, body.unwrap_or_default()))
}

/// An error body is base64 JSON; one that is not base64 is taken as it is.
fn decode_body(raw: &[u8]) -> Bytes {
    let raw = raw.trim_ascii();
    base64::engine::general_purpose::STANDARD
        .decode(raw)
        .map_or_else(|_| Bytes::copy_from_slice(raw), Bytes::from)
}

/// `Lambda-Runtime-Function-Error-Type: T\r\nLambda-Runtime-Function-Error-Body: B\r\n`
/// written as data (by runtimes without trailers): the error it names.
fn in_body_error(data: &[u8]) -> Option<(Option<String>, Bytes)> {
    // Only a short frame of exactly these lines qualifies.
    if data.len() > 64 << 10 {
        return None;
    }
    let text = std::str::from_utf8(data).ok()?;
    let mut error_type = None;
    let mut body = None;
    for line in text.split_terminator("\r\n") {
        let (name, value) = line.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            wire::HEADER_FUNCTION_ERROR_TYPE if error_type.is_none() => {
                error_type = Some(value.trim().to_string());
            }
            wire::HEADER_FUNCTION_ERROR_BODY if body.is_none() => {
                body = Some(decode_body(value.as_bytes()))
            }
            _ => return None,
        }
    }
    Some((Some(error_type?), body.unwrap_or_default()))
}

/// An invocation whose response may stream, seen from its caller's side.
pub(crate) enum Begun {
    /// The function streams: its content type, then [`Streaming::next`] until the end.
    Streaming {
        content_type: Option<String>,
        rest: Streaming,
    },
    /// The invocation ended without streaming: a function that answers at once, or a
    /// failure before the first byte.
    Finished(Result<Invoked, InvokeError>),
}

/// The rest of a streamed response.
pub(crate) struct Streaming {
    events: mpsc::Receiver<StreamEvent>,
    task: JoinHandle<Result<Invoked, InvokeError>>,
    /// The invocation's end, once known: handed out after the chunks still queued.
    ended: Option<Result<Invoked, InvokeError>>,
}

/// The next part of a streamed response.
pub(crate) enum Next {
    Chunk(Bytes),
    /// The invocation is over (a function error or timeout here came in mid-stream).
    End(Result<Invoked, InvokeError>),
}

/// Starts `request` on `function` at `version`, and waits until it either begins a stream or ends.
/// The invocation runs on its own task: a caller that goes away stops only the relaying
/// (the rest of the stream is read and dropped), never the function.
pub(crate) async fn begin(
    scheduler: Arc<Scheduler>,
    function: String,
    version: String,
    request: InvokeRequest,
) -> Begun {
    let (sink, mut events) = channel();
    let mut task = tokio::spawn(async move {
        scheduler
            .invoke_streaming(&function, &version, request, sink)
            .await
    });
    let started = tokio::select! {
        biased;
        event = events.recv() => event,
        done = &mut task => return Begun::Finished(joined(done)),
    };
    match started {
        Some(StreamEvent::Start { content_type }) => Begun::Streaming {
            content_type,
            rest: Streaming {
                events,
                task,
                ended: None,
            },
        },
        // The sink is gone, or a chunk came without its start (never): the end decides.
        _ => Begun::Finished(joined(task.await)),
    }
}

impl Streaming {
    /// The next chunk, or the invocation's end after the last one. Not to be called
    /// again after [`Next::End`].
    pub(crate) async fn next(&mut self) -> Next {
        loop {
            if let Some(ended) = self.ended.take() {
                // Every chunk was queued before the invocation completed.
                return match self.events.try_recv() {
                    Ok(StreamEvent::Chunk(c)) => {
                        self.ended = Some(ended);
                        Next::Chunk(c)
                    }
                    Ok(StreamEvent::Start { .. }) => {
                        self.ended = Some(ended);
                        continue;
                    }
                    Err(_) => Next::End(ended),
                };
            }
            tokio::select! {
                biased;
                event = self.events.recv() => match event {
                    Some(StreamEvent::Chunk(c)) => return Next::Chunk(c),
                    Some(StreamEvent::Start { .. }) => {}
                    None => return Next::End(joined((&mut self.task).await)),
                },
                done = &mut self.task => self.ended = Some(joined(done)),
            }
        }
    }
}

fn joined(
    done: Result<Result<Invoked, InvokeError>, tokio::task::JoinError>,
) -> Result<Invoked, InvokeError> {
    done.unwrap_or_else(|e| {
        tracing::error!(error = %e, "streaming invocation task failed");
        Err(InvokeError::ShuttingDown)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_body_error_lines_are_recognised_and_nothing_else() {
        let body = base64::engine::general_purpose::STANDARD.encode(br#"{"errorType":"X"}"#);
        let lines = format!(
            "Lambda-Runtime-Function-Error-Type: Runtime.Boom\r\nLambda-Runtime-Function-Error-Body: {body}\r\n"
        );
        let (t, b) = in_body_error(lines.as_bytes()).expect("recognised");
        assert_eq!(t.as_deref(), Some("Runtime.Boom"));
        assert_eq!(&b[..], br#"{"errorType":"X"}"#);
        for data in [
            &b"hello"[..],
            b"Lambda-Runtime-Function-Error-Body: eA==\r\n",
            b"Lambda-Runtime-Function-Error-Type: A\r\nOther: x\r\n",
            b"",
        ] {
            assert!(in_body_error(data).is_none(), "{data:?}");
        }
    }

    #[test]
    fn trailers_name_the_error() {
        let mut t = HeaderMap::new();
        assert!(error_of(&t).is_none());
        t.insert(
            wire::HEADER_FUNCTION_ERROR_TYPE,
            "Function.Oops".parse().unwrap(),
        );
        t.insert(
            wire::HEADER_FUNCTION_ERROR_BODY,
            "bm90IGpzb24=".parse().unwrap(),
        );
        let (ty, body) = error_of(&t).unwrap();
        assert_eq!(ty.as_deref(), Some("Function.Oops"));
        assert_eq!(&body[..], b"not json");
    }
}
