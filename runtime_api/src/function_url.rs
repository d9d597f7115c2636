//! Function URLs: a function with `url = true` is served over plain HTTP, as Lambda's
//! function URLs serve it (auth type `NONE`).
//!
//! Each such function gets its own listener, at the Invoke API's address and the
//! function's `url_port` (a free port by default); `kindling serve` prints
//! `function URL <name> http://<addr>/` for each. Every request on it, whatever its method
//! and path, is one invocation, with the request as a payload format 2.0 event (`headers`
//! with repeated values joined by commas, `cookies`, `rawPath`, `rawQueryString` and
//! `queryStringParameters`, `body`, base64 with `isBase64Encoded` unless its content type
//! is text, and `requestContext` with `http.method/path/protocol/sourceIp/userAgent`,
//! `requestId`, `time`, `timeEpoch`, `domainName` from the `Host` the client used, `apiId`
//! (a fixed id per function name) and `accountId` `anonymous`).
//!
//! The answer is built from the function's response as Lambda builds it: an object with
//! `statusCode` gives the status, `headers`, `cookies` (one `Set-Cookie` each) and `body`
//! (decoded when `isBase64Encoded`); any other JSON is a 200 `application/json` answer
//! whose body is that JSON (a JSON string: its text). A function error or timeout is 502,
//! throttling 429. A streamed response goes to the client as it arrives: with the HTTP
//! integration content type, its JSON prelude (`statusCode`, `headers`, `cookies`) up to
//! the 8 NUL bytes makes the head and the rest is the body; otherwise the stream is a 200
//! body of its content type. A failure in mid-stream ends the body abruptly, so that the
//! client sees a broken response rather than a short one.
//!
//! Bounds: a request body of at most 6 MB ([`MAX_REQUEST_BYTES`], 413 past it), a
//! prelude of at most [`MAX_PRELUDE_BYTES`], and the Invoke API's connection limits
//! (head and body timeouts, keep-alive, connection cap).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use kindling_wire::MAX_REQUEST_BYTES;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::connections::{Busy, ConnectionLimits};
use crate::invoke_api::{read_body, whole, AnswerBody, Answering, BoxError, HEADER_REQUEST_ID};
use crate::scheduler::{
    civil_from_days, Answer, InvokeError, InvokeRequest, Invoked, Scheduler, VERSION,
};
use crate::streaming::{self, Begun, Next, Streaming, HTTP_INTEGRATION_CONTENT_TYPE};

/// The longest prelude a streamed HTTP response may send before its 8 NUL bytes.
pub const MAX_PRELUDE_BYTES: usize = 64 << 10;
/// What ends the prelude of a streamed HTTP response.
const PRELUDE_END: [u8; 8] = [0; 8];
/// Body chunks that may wait for a slow client.
const ANSWER_DEPTH: usize = 2;

/// One function's URL.
pub(crate) struct FunctionUrl {
    scheduler: Arc<Scheduler>,
    function: String,
    limits: ConnectionLimits,
    /// `requestContext.apiId`: Lambda's URL id, here fixed per function name.
    api_id: String,
}

impl FunctionUrl {
    pub fn new(scheduler: Arc<Scheduler>, function: String, limits: ConnectionLimits) -> Self {
        let digest = Sha256::digest(function.as_bytes());
        let api_id = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            scheduler,
            function,
            limits,
            api_id,
        }
    }

    async fn serve(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        busy: Busy,
    ) -> Response<AnswerBody> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let mut event = request_event(&req, peer, &request_id, &self.api_id);
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = match read_body(req, self.limits.body_read_timeout, MAX_REQUEST_BYTES).await {
            Ok(body) => body,
            Err(refusal) => return refusal.map(whole),
        };
        add_body(&mut event, &body, content_type.as_deref());
        let request = InvokeRequest {
            payload: Bytes::from(Value::Object(event).to_string()),
            request_id: Some(request_id.clone()),
            ..InvokeRequest::default()
        };
        let begun = streaming::begin(
            self.scheduler.clone(),
            self.function.clone(),
            VERSION.to_string(),
            request,
        )
        .await;
        let mut answer = match begun {
            Begun::Finished(Ok(invoked)) => buffered_answer(&invoked).map(whole),
            Begun::Finished(Err(e)) => refused(&e).map(whole),
            Begun::Streaming { content_type, rest } => {
                let http = content_type.as_deref() == Some(HTTP_INTEGRATION_CONTENT_TYPE);
                streamed_answer(rest, http, content_type, busy).await
            }
        };
        if let Ok(id) = HeaderValue::from_str(&request_id) {
            answer.headers_mut().insert(HEADER_REQUEST_ID, id);
        }
        answer
    }
}

impl Answering for FunctionUrl {
    fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    fn answer(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        busy: Busy,
    ) -> impl std::future::Future<Output = Response<AnswerBody>> + Send {
        self.serve(req, peer, busy)
    }
}

/// The payload format 2.0 event of a request, all but its body.
fn request_event(
    req: &Request<Incoming>,
    peer: SocketAddr,
    request_id: &str,
    api_id: &str,
) -> Map<String, Value> {
    let mut headers = Map::new();
    let mut cookies = Vec::new();
    for name in req.headers().keys() {
        let values: Vec<String> = req
            .headers()
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        if name == header::COOKIE {
            cookies.extend(
                values
                    .iter()
                    .flat_map(|v| v.split(';'))
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(|c| Value::from(c.to_string())),
            );
        } else {
            headers.insert(name.as_str().to_string(), values.join(",").into());
        }
    }
    let query = req.uri().query().unwrap_or("");
    let header_text = |name: &HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let domain = match header_text(&header::HOST) {
        host if !host.is_empty() => host,
        _ => peer.to_string(),
    };
    let domain_prefix = domain.split(['.', ':']).next().unwrap_or("").to_string();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut event = Map::new();
    event.insert("version".into(), "2.0".into());
    event.insert("routeKey".into(), "$default".into());
    event.insert("rawPath".into(), req.uri().path().into());
    event.insert("rawQueryString".into(), query.into());
    if !cookies.is_empty() {
        event.insert("cookies".into(), Value::Array(cookies));
    }
    event.insert("headers".into(), Value::Object(headers));
    if !query.is_empty() {
        let mut params: Map<String, Value> = Map::new();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match params.get_mut(k.as_ref()) {
                Some(Value::String(joined)) => {
                    joined.push(',');
                    joined.push_str(&v);
                }
                _ => {
                    params.insert(k.into_owned(), v.into_owned().into());
                }
            }
        }
        event.insert("queryStringParameters".into(), Value::Object(params));
    }
    event.insert(
        "requestContext".into(),
        json!({
            "accountId": "anonymous",
            "apiId": api_id,
            "domainName": domain,
            "domainPrefix": domain_prefix,
            "http": {
                "method": req.method().as_str(),
                "path": req.uri().path(),
                "protocol": format!("{:?}", req.version()),
                "sourceIp": peer.ip().to_string(),
                "userAgent": header_text(&header::USER_AGENT),
            },
            "requestId": request_id,
            "routeKey": "$default",
            "stage": "$default",
            "time": request_time(now.as_secs()),
            "timeEpoch": u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
        }),
    );
    event.insert("isBase64Encoded".into(), false.into());
    event
}

/// Adds the request's body: as text when its content type is text and it is UTF-8,
/// else base64 with `isBase64Encoded`.
fn add_body(event: &mut Map<String, Value>, body: &[u8], content_type: Option<&str>) {
    if body.is_empty() {
        return;
    }
    let text = content_type
        .is_some_and(is_text)
        .then(|| std::str::from_utf8(body).ok())
        .flatten();
    let (value, base64) = match text {
        Some(text) => (text.to_string(), false),
        None => (base64::engine::general_purpose::STANDARD.encode(body), true),
    };
    event.insert("body".into(), value.into());
    event.insert("isBase64Encoded".into(), base64.into());
}

fn is_text(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence.starts_with("text/")
        || essence.ends_with("+json")
        || essence.ends_with("+xml")
        || [
            "application/json",
            "application/javascript",
            "application/xml",
            "application/x-www-form-urlencoded",
        ]
        .contains(&essence.as_str())
}

/// `12/Mar/2020:19:03:58 +0000`, as `requestContext.time` has it.
fn request_time(epoch_secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, m, d) = civil_from_days(epoch_secs / 86_400);
    let s = epoch_secs % 86_400;
    let month = usize::try_from(m.saturating_sub(1)).map_or("Jan", |i| MONTHS[i % 12]);
    format!(
        "{d:02}/{month}/{y:04}:{:02}:{:02}:{:02} +0000",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// The answer to a function that answered at once (or failed).
fn buffered_answer(invoked: &Invoked) -> Response<Full<Bytes>> {
    match &invoked.answer {
        Answer::Response(payload) => http_response(payload).unwrap_or_else(bad_gateway),
        Answer::Error { .. } => bad_gateway(),
    }
}

/// A function's response as an HTTP answer; `None` when it cannot be one.
fn http_response(payload: &[u8]) -> Option<Response<Full<Bytes>>> {
    let value: Value = serde_json::from_slice(payload).ok()?;
    let Some(status) = value.get("statusCode") else {
        // Any JSON without a status: a 200 JSON answer of that JSON (a string: its text).
        let body = match &value {
            Value::String(text) => Bytes::from(text.clone()),
            _ => Bytes::copy_from_slice(payload),
        };
        let mut r = Response::new(Full::new(body));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return Some(r);
    };
    let head = head_of(status, value.get("headers"), value.get("cookies"))?;
    let body = match value.get("body") {
        None | Some(Value::Null) => Bytes::new(),
        Some(Value::String(text)) if value["isBase64Encoded"] == true => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .ok()?,
        ),
        Some(Value::String(text)) => Bytes::from(text.clone()),
        Some(other) => Bytes::from(other.to_string()),
    };
    Some(head.map(|()| Full::new(body)))
}

/// The status line and headers a function asked for (a streamed response's prelude,
/// or a buffered response's fields); `None` when they are not valid HTTP.
fn head_of(
    status: &Value,
    headers: Option<&Value>,
    cookies: Option<&Value>,
) -> Option<Response<()>> {
    let status = StatusCode::from_u16(u16::try_from(status.as_u64()?).ok()?).ok()?;
    let mut map = HeaderMap::new();
    if let Some(Value::Object(headers)) = headers {
        for (name, value) in headers {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            map.append(
                HeaderName::from_bytes(name.as_bytes()).ok()?,
                HeaderValue::from_str(&text).ok()?,
            );
        }
    }
    if let Some(Value::Array(cookies)) = cookies {
        for cookie in cookies {
            map.append(
                header::SET_COOKIE,
                HeaderValue::from_str(cookie.as_str()?).ok()?,
            );
        }
    }
    // A body a client would misframe is not ours to pass on.
    map.remove(header::CONTENT_LENGTH);
    map.remove(header::TRANSFER_ENCODING);
    map.remove(header::CONNECTION);
    map.entry(header::CONTENT_TYPE)
        .or_insert(HeaderValue::from_static("application/json"));
    let mut r = Response::new(());
    *r.status_mut() = status;
    *r.headers_mut() = map;
    Some(r)
}

/// A streamed response: its head (from the prelude when `http`), then its body as the
/// function writes it, on a task that holds the connection busy until the end.
async fn streamed_answer(
    mut rest: Streaming,
    http: bool,
    content_type: Option<String>,
    busy: Busy,
) -> Response<AnswerBody> {
    let (head, first) = if http {
        match read_prelude(&mut rest).await {
            Ok(found) => found,
            Err(answer) => return answer.map(whole),
        }
    } else {
        let mut head = Response::new(());
        let ct = content_type
            .and_then(|c| HeaderValue::from_str(&c).ok())
            .unwrap_or(HeaderValue::from_static("application/octet-stream"));
        head.headers_mut().insert(header::CONTENT_TYPE, ct);
        (head, Bytes::new())
    };
    let (mut tx, body) = Channel::<Bytes, BoxError>::new(ANSWER_DEPTH);
    tokio::spawn(async move {
        let _busy = busy;
        if !first.is_empty() && tx.send_data(first).await.is_err() {
            return;
        }
        loop {
            match rest.next().await {
                Next::Chunk(chunk) => {
                    if tx.send_data(chunk).await.is_err() {
                        return; // the client went away
                    }
                }
                Next::End(Ok(Invoked {
                    answer: Answer::Response(_),
                    ..
                })) => return,
                Next::End(ended) => {
                    let why = match ended {
                        Ok(Invoked {
                            answer: Answer::Error { error_type, .. },
                            ..
                        }) => error_type,
                        Ok(_) => String::new(),
                        Err(e) => e.to_string(),
                    };
                    tx.abort(format!("the function failed in mid-stream: {why}").into());
                    return;
                }
            }
        }
    });
    head.map(|()| body.boxed())
}

/// Reads a streamed HTTP response up to the end of its prelude: the head it asks for
/// and the body bytes that came with the prelude's end; or the answer when there is no
/// valid prelude (502), or the function failed first.
async fn read_prelude(
    rest: &mut Streaming,
) -> Result<(Response<()>, Bytes), Response<Full<Bytes>>> {
    let mut seen = BytesMut::new();
    loop {
        match rest.next().await {
            Next::Chunk(chunk) => {
                let searched_from = seen.len().saturating_sub(PRELUDE_END.len() - 1);
                seen.extend_from_slice(&chunk);
                let found = seen[searched_from..]
                    .windows(PRELUDE_END.len())
                    .position(|w| w == PRELUDE_END)
                    .map(|at| searched_from + at);
                if let Some(at) = found {
                    let body = seen.split_off(at + PRELUDE_END.len()).freeze();
                    let prelude: Value =
                        serde_json::from_slice(&seen[..at]).map_err(|_| bad_gateway())?;
                    let head = head_of(
                        prelude.get("statusCode").unwrap_or(&json!(200)),
                        prelude.get("headers"),
                        prelude.get("cookies"),
                    )
                    .ok_or_else(bad_gateway)?;
                    return Ok((head, body));
                }
                if seen.len() > MAX_PRELUDE_BYTES {
                    return Err(bad_gateway());
                }
            }
            Next::End(Ok(invoked)) => {
                return Err(match invoked.answer {
                    Answer::Error { .. } => bad_gateway(),
                    // Ended without a prelude: what there was is the body.
                    Answer::Response(_) => {
                        plain(StatusCode::OK, "application/octet-stream", seen.freeze())
                    }
                });
            }
            Next::End(Err(e)) => return Err(refused(&e)),
        }
    }
}

/// The answer to an invocation that could not run.
fn refused(e: &InvokeError) -> Response<Full<Bytes>> {
    match e {
        InvokeError::TooManyRequests(_) => message(StatusCode::TOO_MANY_REQUESTS, "Rate Exceeded."),
        InvokeError::NotFound(_) => message(StatusCode::NOT_FOUND, "Not Found"),
        InvokeError::ShuttingDown => {
            message(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable")
        }
        InvokeError::Environment { .. } => bad_gateway(),
    }
}

/// Lambda's answer to a function that failed, timed out or answered nonsense.
fn bad_gateway() -> Response<Full<Bytes>> {
    message(StatusCode::BAD_GATEWAY, "Internal Server Error")
}

fn message(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    plain(
        status,
        "application/json",
        Bytes::from(json!({ "Message": text }).to_string()),
    )
}

fn plain(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(r: Response<Full<Bytes>>) -> (StatusCode, HeaderMap, Vec<u8>) {
        let (parts, body) = r.into_parts();
        let bytes = collected(body);
        (parts.status, parts.headers, bytes)
    }

    fn collected(body: Full<Bytes>) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async { body.collect().await.unwrap().to_bytes().to_vec() })
    }

    #[test]
    fn responses_are_translated_as_lambda_does() {
        let (s, h, b) = body_of(http_response(br#""hello""#).unwrap());
        assert_eq!(
            (s, h["content-type"].to_str().unwrap(), &b[..]),
            (StatusCode::OK, "application/json", &b"hello"[..])
        );
        let (s, _, b) = body_of(http_response(br#"{"message":"hi"}"#).unwrap());
        assert_eq!((s, &b[..]), (StatusCode::OK, &br#"{"message":"hi"}"#[..]));
        let full = br#"{"statusCode":201,"headers":{"content-type":"text/plain","x-a":"1"},"cookies":["a=1","b=2"],"body":"aGk=","isBase64Encoded":true}"#;
        let (s, h, b) = body_of(http_response(full).unwrap());
        assert_eq!(s, StatusCode::CREATED);
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(h["x-a"], "1");
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);
        assert_eq!(&b[..], b"hi");
        assert!(http_response(b"not json").is_none());
        assert!(http_response(br#"{"statusCode":99}"#).is_none());
    }

    #[test]
    fn request_times_are_formatted() {
        assert_eq!(request_time(1_583_348_638), "04/Mar/2020:19:03:58 +0000");
        assert!(is_text("application/json; charset=utf-8"));
        assert!(is_text("text/html"));
        assert!(!is_text("application/octet-stream"));
        assert!(!is_text("image/png"));
    }
}
