//! `InvokeWithResponseStream`:
//! `POST /2021-11-15/functions/{name}/response-streaming-invocations`, answered in AWS's
//! event-stream encoding ([`crate::event_stream`]): `PayloadChunk` events as the
//! function streams its response, then one `InvokeComplete` (with `ErrorCode` and
//! `ErrorDetails` when it failed, before or in mid-stream, and `LogResult` when
//! `X-Amz-Log-Type: Tail` asked for it). A function that does not stream answers with its
//! whole payload as one chunk, as Lambda does. Failures before any answer (unknown
//! function, throttling) are the usual Lambda error answers.
//!
//! `ErrorCode` is the recorded error type (`Function.ResponseSizeTooLarge`,
//! `Sandbox.Timedout`, the function's own type such as `Runtime.Unknown`), `ErrorDetails`
//! the error's JSON.

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use kindling_wire::MAX_REQUEST_BYTES;

use super::{
    json_payload, lambda_error, read_body, refused_name, status_only, InvokeApi, InvokeHeaders,
    HEADER_EXECUTED_VERSION, HEADER_REQUEST_ID,
};
use crate::client::InvocationType;
use crate::connections::Busy;
use crate::event_stream;
use crate::logs;
use crate::names;
use crate::scheduler::{Answer, InvokeError, InvokeRequest, Invoked, VERSION};
use crate::streaming::{self, Begun, Next};

/// A boxed body error: answers stream, and a stream may break.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every answer of the Invoke API's listener.
pub(crate) type AnswerBody = BoxBody<Bytes, BoxError>;

const PATH_PREFIX: &str = "/2021-11-15/functions/";
const PATH_SUFFIX: &str = "/response-streaming-invocations";
/// Event-stream messages that may wait for a slow caller.
const ANSWER_DEPTH: usize = 2;

/// A body held whole.
pub(crate) fn whole(body: Full<Bytes>) -> AnswerBody {
    body.map_err(|e| match e {}).boxed()
}

/// The function name in a streaming invocation's path.
fn streaming_name(path: &str) -> Option<&str> {
    path.strip_prefix(PATH_PREFIX)?.strip_suffix(PATH_SUFFIX)
}

impl InvokeApi {
    /// Every request of the listener: streaming invocations here, the rest to
    /// [`InvokeApi::handle`]. `busy` marks the connection busy until the answer's body
    /// has been written (a stream lasts as long as its function).
    pub(super) async fn route(&self, req: Request<Incoming>, busy: Busy) -> Response<AnswerBody> {
        if let Some(name) = streaming_name(req.uri().path()) {
            let name = name.to_string();
            return self.invoke_with_response_stream(&name, req, busy).await;
        }
        let answer = self.handle(req).await;
        drop(busy);
        answer.map(whole)
    }

    async fn invoke_with_response_stream(
        &self,
        name: &str,
        req: Request<Incoming>,
        busy: Busy,
    ) -> Response<AnswerBody> {
        if req.method() != Method::POST {
            return lambda_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowedException",
                "use POST",
            )
            .map(whole);
        }
        let named = match names::parse(name, req.uri().query(), self.scheduler.region()) {
            Ok(named) => named,
            Err(e) => return refused_name(&e).map(whole),
        };
        let (function, version) = match self.resolve_named(&named) {
            Ok(found) => found,
            Err(r) => return r.map(whole),
        };
        let headers = match InvokeHeaders::parse(req.headers()) {
            Ok(headers) => headers,
            Err(refusal) => return refusal.map(whole),
        };
        match headers.invocation_type {
            InvocationType::RequestResponse => {}
            InvocationType::DryRun => return status_only(StatusCode::NO_CONTENT).map(whole),
            InvocationType::Event => {
                return lambda_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameterValueException",
                    "X-Amz-Invocation-Type must be RequestResponse or DryRun",
                )
                .map(whole)
            }
        }
        let payload = match read_body(
            req,
            &self.limits,
            MAX_REQUEST_BYTES,
            Some("InvokeWithResponseStream"),
        )
        .await
        {
            Ok(p) => p,
            Err(r) => return r.map(whole),
        };
        let payload = match json_payload(payload) {
            Ok(p) => p,
            Err(r) => return r.map(whole),
        };
        let request_id = uuid::Uuid::new_v4().to_string();
        let request = InvokeRequest {
            payload,
            client_context: headers.client_context,
            cognito_identity: None,
            trace_id: headers.trace_id,
            request_id: Some(request_id.clone()),
            // `$LATEST` named or not, the function sees its unqualified ARN.
            qualifier: named.qualifier.clone().filter(|q| q != VERSION),
        };
        let tail = headers.tail;
        let executed = HeaderValue::from_str(&version).ok();
        let begun = streaming::begin(self.scheduler.clone(), function.name, version, request);
        let body = match begun.await {
            Begun::Finished(Err(e)) => return self.refused(e).map(whole),
            Begun::Finished(Ok(invoked)) => {
                let mut all = Vec::new();
                if let Answer::Response(payload) = &invoked.answer {
                    if !payload.is_empty() {
                        all.extend_from_slice(&event_stream::payload_chunk(payload));
                    }
                }
                all.extend_from_slice(&completion(&Ok(invoked), tail));
                whole(Full::new(Bytes::from(all)))
            }
            Begun::Streaming { mut rest, .. } => {
                let (mut tx, body) = Channel::<Bytes, BoxError>::new(ANSWER_DEPTH);
                tokio::spawn(async move {
                    let _busy = busy;
                    loop {
                        match rest.next().await {
                            Next::Chunk(chunk) => {
                                let event = event_stream::payload_chunk(&chunk);
                                if tx.send_data(event).await.is_err() {
                                    return; // the caller went away
                                }
                            }
                            Next::End(ended) => {
                                let _ = tx.send_data(completion(&ended, tail)).await;
                                return;
                            }
                        }
                    }
                });
                body.boxed()
            }
        };
        let mut r = Response::new(body);
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(event_stream::CONTENT_TYPE),
        );
        if let Ok(id) = HeaderValue::from_str(&request_id) {
            h.insert(HEADER_REQUEST_ID, id);
        }
        if let Some(v) = executed {
            h.insert(HEADER_EXECUTED_VERSION, v);
        }
        r
    }
}

/// The `InvokeComplete` event of an invocation's end.
fn completion(ended: &Result<Invoked, InvokeError>, tail: bool) -> Bytes {
    match ended {
        Ok(invoked) => {
            let log = tail.then(|| {
                base64::engine::general_purpose::STANDARD.encode(logs::tail(&invoked.log))
            });
            let error = match &invoked.answer {
                Answer::Response(_) => None,
                Answer::Error { error_type, body } => Some((
                    error_type.as_str(),
                    String::from_utf8_lossy(body).into_owned(),
                )),
            };
            event_stream::invoke_complete(
                error
                    .as_ref()
                    .map(|(code, details)| (*code, details.as_str())),
                log.as_deref(),
            )
        }
        Err(e) => event_stream::invoke_complete(Some(("ServiceException", &e.to_string())), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_streaming_path_is_taken() {
        assert_eq!(
            streaming_name("/2021-11-15/functions/fn/response-streaming-invocations"),
            Some("fn")
        );
        assert_eq!(streaming_name("/2015-03-31/functions/fn/invocations"), None);
    }
}
