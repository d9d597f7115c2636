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
//! With `url_payload = "1.0"` the events are API Gateway REST's Lambda proxy events
//! instead, as a `/{proxy+}` resource on stage `$default` receives them (`resource`,
//! `path`, `httpMethod`, `headers`/`queryStringParameters` with each name's last value and
//! `multiValueHeaders`/`multiValueQueryStringParameters` with all, `pathParameters.proxy`,
//! `stageVariables`, `body` and `isBase64Encoded`, and `requestContext` with `identity`,
//! `requestTime(Epoch)`, `resourcePath`, `stage` and the account's id); `null` where API
//! Gateway sends `null`. The stage is `$default` so that clients that add a named stage to
//! the path (`lambda_http`) leave it as it came.
//!
//! The answer is built from the function's response as Lambda builds it: an object with
//! `statusCode` gives the status, `headers`, `cookies` (one `Set-Cookie` each) and `body`
//! (decoded when `isBase64Encoded`); any other JSON is a 200 `application/json` answer
//! whose body is that JSON (a JSON string: its text); in format 1.0, as API Gateway REST
//! reads it, `statusCode` and a string `body` are required (else 502) and
//! `multiValueHeaders` add to `headers`. A function error or timeout is 502,
//! throttling 429. A streamed response goes to the client as it arrives: with the HTTP
//! integration content type, its JSON prelude (`statusCode`, `headers`, `cookies`) up to
//! the 8 NUL bytes makes the head and the rest is the body; otherwise the stream is a 200
//! body of its content type. A failure in mid-stream ends the body abruptly, so that the
//! client sees a broken response rather than a short one.
//!
//! Bounds: a request body of at most 6 MB ([`MAX_REQUEST_BYTES`], 413 past it), a
//! prelude of at most [`MAX_PRELUDE_BYTES`], and the Invoke API's connection limits
//! (head and body timeouts, keep-alive, connection cap).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use kindling_wire::MAX_REQUEST_BYTES;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::connections::{Busy, ConnectionLimits};
use crate::invoke_api::{
    self, read_body, whole, AnswerBody, Answering, BoxError, HEADER_REQUEST_ID,
};
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

/// The events a function URL sends, and how it reads the answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadFormat {
    /// Lambda's function URLs (API Gateway HTTP API's payload format 2.0).
    #[default]
    #[serde(rename = "2.0")]
    V2,
    /// API Gateway REST API's Lambda proxy integration (payload format 1.0).
    #[serde(rename = "1.0")]
    V1,
}

impl std::str::FromStr for PayloadFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "2.0" => Ok(Self::V2),
            "1.0" => Ok(Self::V1),
            other => Err(format!(
                "{other:?} is not a payload format: \"2.0\" (function URLs) or \"1.0\" (API Gateway REST)"
            )),
        }
    }
}

/// A function URL's settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UrlConfig {
    /// Its port at the Invoke API's address (0: a free one).
    pub port: u16,
    pub payload: PayloadFormat,
}

/// One function's URL.
pub(crate) struct FunctionUrl {
    scheduler: Arc<Scheduler>,
    function: String,
    limits: ConnectionLimits,
    payload: PayloadFormat,
    /// `requestContext.apiId`: Lambda's URL id, here fixed per function name.
    api_id: String,
    /// `requestContext.accountId` of a REST event (function URLs say `anonymous`).
    account_id: String,
}

impl FunctionUrl {
    pub fn new(
        scheduler: Arc<Scheduler>,
        function: String,
        limits: ConnectionLimits,
        payload: PayloadFormat,
    ) -> Self {
        let digest = Sha256::digest(function.as_bytes());
        let api_id = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        // arn:aws:lambda:REGION:ACCOUNT:function:NAME
        let account_id = scheduler
            .arn(&function)
            .split(':')
            .nth(4)
            .unwrap_or_default()
            .to_string();
        Self {
            scheduler,
            function,
            limits,
            payload,
            api_id,
            account_id,
        }
    }

    async fn serve(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        busy: Busy,
    ) -> Response<AnswerBody> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let seen = Seen::of(&req, peer);
        let mut event = match self.payload {
            PayloadFormat::V2 => seen.event_v2(&request_id, &self.api_id),
            PayloadFormat::V1 => seen.event_v1(&request_id, &self.api_id, &self.account_id),
        };
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = match read_body(req, &self.limits, MAX_REQUEST_BYTES, None).await {
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
            Begun::Finished(Ok(invoked)) => buffered_answer(&invoked, self.payload).map(whole),
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

/// The function URLs being served: functions.toml's and those the control plane
/// creates, each on a listener of its own at the Invoke API's address.
pub(crate) struct UrlServers {
    scheduler: Arc<Scheduler>,
    limits: ConnectionLimits,
    ip: IpAddr,
    served: Mutex<Served>,
}

#[derive(Default)]
struct Served {
    /// By function: its address, its format, and what stops it.
    urls: BTreeMap<String, (SocketAddr, PayloadFormat, watch::Sender<bool>)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Shut down: nothing more is served.
    closed: bool,
}

impl UrlServers {
    pub fn new(scheduler: Arc<Scheduler>, limits: ConnectionLimits, ip: IpAddr) -> Self {
        Self {
            scheduler,
            limits,
            ip,
            served: Mutex::new(Served::default()),
        }
    }

    fn served(&self) -> std::sync::MutexGuard<'_, Served> {
        self.served.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A listener at the Invoke API's address and `port` (0: a free one).
    pub async fn bind(&self, port: u16) -> std::io::Result<TcpListener> {
        TcpListener::bind(SocketAddr::new(self.ip, port)).await
    }

    /// Serves `function`'s URL on `listener` (in place of any it had); its address.
    pub fn serve(
        &self,
        function: &str,
        listener: TcpListener,
        payload: PayloadFormat,
    ) -> std::io::Result<SocketAddr> {
        let addr = listener.local_addr()?;
        let url = Arc::new(FunctionUrl::new(
            self.scheduler.clone(),
            function.to_string(),
            self.limits.clone(),
            payload,
        ));
        let mut served = self.served();
        if served.closed {
            return Err(std::io::Error::other("the server is shutting down"));
        }
        let (stop, stopped) = watch::channel(false);
        served
            .tasks
            .push(tokio::spawn(invoke_api::serve(listener, url, stopped)));
        if let Some((_, _, old)) = served
            .urls
            .insert(function.to_string(), (addr, payload, stop))
        {
            old.send_replace(true);
        }
        served.tasks.retain(|t| !t.is_finished());
        Ok(addr)
    }

    /// Where `function`'s URL is served, if it has one.
    pub fn addr(&self, function: &str) -> Option<SocketAddr> {
        self.served().urls.get(function).map(|(addr, _, _)| *addr)
    }

    /// Stops serving `function`'s URL (its answers in progress are still written).
    pub fn remove(&self, function: &str) {
        if let Some((_, _, stop)) = self.served().urls.remove(function) {
            stop.send_replace(true);
        }
    }

    /// Stops every URL and waits for their answers in progress.
    pub async fn shutdown(&self) {
        let tasks = {
            let mut served = self.served();
            served.closed = true;
            for (_, _, stop) in served.urls.values() {
                stop.send_replace(true);
            }
            std::mem::take(&mut served.tasks)
        };
        for task in tasks {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "a function URL task failed");
            }
        }
    }
}

impl Answering for FunctionUrl {
    fn limits(&self) -> ConnectionLimits {
        self.limits.clone()
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

/// What both event formats take from a request's head.
struct Seen {
    method: String,
    path: String,
    query: String,
    protocol: String,
    /// Each header's values, in the order they came; `Cookie` among them.
    headers: Vec<(String, Vec<String>)>,
    source_ip: String,
    user_agent: String,
    /// The `Host` the client used, else the address it reached.
    domain: String,
    now: std::time::Duration,
}

impl Seen {
    fn of(req: &Request<Incoming>, peer: SocketAddr) -> Self {
        let headers = req
            .headers()
            .keys()
            .map(|name| {
                let values = req
                    .headers()
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                (name.as_str().to_string(), values)
            })
            .collect();
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
        Self {
            method: req.method().as_str().to_string(),
            path: req.uri().path().to_string(),
            query: req.uri().query().unwrap_or("").to_string(),
            protocol: format!("{:?}", req.version()),
            headers,
            source_ip: peer.ip().to_string(),
            user_agent: header_text(&header::USER_AGENT),
            domain,
            now: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        }
    }

    fn domain_prefix(&self) -> String {
        self.domain
            .split(['.', ':'])
            .next()
            .unwrap_or("")
            .to_string()
    }

    fn epoch_ms(&self) -> u64 {
        u64::try_from(self.now.as_millis()).unwrap_or(u64::MAX)
    }

    /// The query string's parameters, each with its values in order.
    fn query_values(&self) -> Vec<(String, Vec<String>)> {
        let mut params: Vec<(String, Vec<String>)> = Vec::new();
        for (k, v) in form_urlencoded::parse(self.query.as_bytes()) {
            match params.iter_mut().find(|(name, _)| *name == k) {
                Some((_, values)) => values.push(v.into_owned()),
                None => params.push((k.into_owned(), vec![v.into_owned()])),
            }
        }
        params
    }

    /// The payload format 2.0 event, all but its body: repeated headers and parameters
    /// joined by commas, cookies apart.
    fn event_v2(&self, request_id: &str, api_id: &str) -> Map<String, Value> {
        let mut headers = Map::new();
        let mut cookies = Vec::new();
        for (name, values) in &self.headers {
            if name == header::COOKIE.as_str() {
                cookies.extend(
                    values
                        .iter()
                        .flat_map(|v| v.split(';'))
                        .map(str::trim)
                        .filter(|c| !c.is_empty())
                        .map(|c| Value::from(c.to_string())),
                );
            } else {
                headers.insert(name.clone(), values.join(",").into());
            }
        }
        let mut event = Map::new();
        event.insert("version".into(), "2.0".into());
        event.insert("routeKey".into(), "$default".into());
        event.insert("rawPath".into(), self.path.clone().into());
        event.insert("rawQueryString".into(), self.query.clone().into());
        if !cookies.is_empty() {
            event.insert("cookies".into(), Value::Array(cookies));
        }
        event.insert("headers".into(), Value::Object(headers));
        if !self.query.is_empty() {
            let params = self
                .query_values()
                .into_iter()
                .map(|(k, v)| (k, Value::from(v.join(","))))
                .collect();
            event.insert("queryStringParameters".into(), Value::Object(params));
        }
        event.insert(
            "requestContext".into(),
            json!({
                "accountId": "anonymous",
                "apiId": api_id,
                "domainName": self.domain,
                "domainPrefix": self.domain_prefix(),
                "http": {
                    "method": self.method,
                    "path": self.path,
                    "protocol": self.protocol,
                    "sourceIp": self.source_ip,
                    "userAgent": self.user_agent,
                },
                "requestId": request_id,
                "routeKey": "$default",
                "stage": "$default",
                "time": request_time(self.now.as_secs()),
                "timeEpoch": self.epoch_ms(),
            }),
        );
        event.insert("isBase64Encoded".into(), false.into());
        event
    }

    /// API Gateway REST's proxy event (payload format 1.0) of a `/{proxy+}` resource,
    /// all but its body: single-value maps hold each name's last value, the
    /// `multiValue` maps all of them; empty maps are `null`, as API Gateway sends them.
    fn event_v1(&self, request_id: &str, api_id: &str, account_id: &str) -> Map<String, Value> {
        /// `(single, multi)`: the last value of each name, and all of them.
        fn maps(pairs: Vec<(String, Vec<String>)>) -> (Value, Value) {
            if pairs.is_empty() {
                return (Value::Null, Value::Null);
            }
            let single = pairs
                .iter()
                .map(|(k, v)| (k.clone(), v.last().cloned().unwrap_or_default().into()))
                .collect();
            let multi = pairs.into_iter().map(|(k, v)| (k, v.into())).collect();
            (Value::Object(single), Value::Object(multi))
        }
        let (headers, multi_headers) = maps(self.headers.clone());
        let (query, multi_query) = maps(self.query_values());
        let proxy = self.path.trim_start_matches('/');
        let path_parameters = match proxy {
            "" => Value::Null,
            proxy => json!({ "proxy": proxy }),
        };
        let mut event = Map::new();
        event.insert("resource".into(), "/{proxy+}".into());
        event.insert("path".into(), self.path.clone().into());
        event.insert("httpMethod".into(), self.method.clone().into());
        event.insert("headers".into(), headers);
        event.insert("multiValueHeaders".into(), multi_headers);
        event.insert("queryStringParameters".into(), query);
        event.insert("multiValueQueryStringParameters".into(), multi_query);
        event.insert("pathParameters".into(), path_parameters);
        event.insert("stageVariables".into(), Value::Null);
        event.insert(
            "requestContext".into(),
            json!({
                "accountId": account_id,
                "apiId": api_id,
                "domainName": self.domain,
                "domainPrefix": self.domain_prefix(),
                "extendedRequestId": request_id,
                "httpMethod": self.method,
                "identity": {
                    "accessKey": null,
                    "accountId": null,
                    "caller": null,
                    "cognitoAuthenticationProvider": null,
                    "cognitoAuthenticationType": null,
                    "cognitoIdentityId": null,
                    "cognitoIdentityPoolId": null,
                    "principalOrgId": null,
                    "sourceIp": self.source_ip,
                    "user": null,
                    "userAgent": self.user_agent,
                    "userArn": null,
                },
                "path": self.path,
                "protocol": self.protocol,
                "requestId": request_id,
                "requestTime": request_time(self.now.as_secs()),
                "requestTimeEpoch": self.epoch_ms(),
                "resourceId": api_id.get(..6).unwrap_or(api_id),
                "resourcePath": "/{proxy+}",
                "stage": "$default",
            }),
        );
        event.insert("body".into(), Value::Null);
        event.insert("isBase64Encoded".into(), false.into());
        event
    }
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
fn buffered_answer(invoked: &Invoked, format: PayloadFormat) -> Response<Full<Bytes>> {
    match &invoked.answer {
        Answer::Response(payload) => http_response(payload, format).unwrap_or_else(bad_gateway),
        Answer::Error { .. } => bad_gateway(),
    }
}

/// A function's response as an HTTP answer; `None` when it cannot be one. Format 2.0
/// takes any JSON (without `statusCode`: a 200 JSON answer of that JSON, a string's
/// text); format 1.0 (API Gateway REST) only an object with `statusCode` and a string
/// `body`, and reads `multiValueHeaders` too.
fn http_response(payload: &[u8], format: PayloadFormat) -> Option<Response<Full<Bytes>>> {
    let value: Value = serde_json::from_slice(payload).ok()?;
    let Some(status) = value.get("statusCode") else {
        if format == PayloadFormat::V1 {
            return None;
        }
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
    let head = head_of(status, &value)?;
    let body = match value.get("body") {
        None | Some(Value::Null) => Bytes::new(),
        Some(Value::String(text)) if value["isBase64Encoded"] == true => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .ok()?,
        ),
        Some(Value::String(text)) => Bytes::from(text.clone()),
        Some(_) if format == PayloadFormat::V1 => return None,
        Some(other) => Bytes::from(other.to_string()),
    };
    Some(head.map(|()| Full::new(body)))
}

/// The status line and headers a function asked for (a streamed response's prelude,
/// or a buffered response's fields: `headers`, `multiValueHeaders` and `cookies`);
/// `None` when they are not valid HTTP.
fn head_of(status: &Value, fields: &Value) -> Option<Response<()>> {
    let status = StatusCode::from_u16(u16::try_from(status.as_u64()?).ok()?).ok()?;
    let text = |value: &Value| match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut map = HeaderMap::new();
    let mut add = |name: &str, value: &Value| -> Option<()> {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).ok()?,
            HeaderValue::from_str(&text(value)).ok()?,
        );
        Some(())
    };
    let multi = match fields.get("multiValueHeaders") {
        Some(Value::Object(multi)) => Some(multi),
        _ => None,
    };
    if let Some(Value::Object(headers)) = fields.get("headers") {
        for (name, value) in headers {
            // API Gateway: a name in both maps takes its multi-value values.
            if !multi.is_some_and(|m| m.keys().any(|k| k.eq_ignore_ascii_case(name))) {
                add(name, value)?;
            }
        }
    }
    for (name, values) in multi.into_iter().flatten() {
        for value in values.as_array()? {
            add(name, value)?;
        }
    }
    if let Some(Value::Array(cookies)) = fields.get("cookies") {
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
                    let head = head_of(prelude.get("statusCode").unwrap_or(&json!(200)), &prelude)
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
        let (s, h, b) = body_of(http_response(br#""hello""#, PayloadFormat::V2).unwrap());
        assert_eq!(
            (s, h["content-type"].to_str().unwrap(), &b[..]),
            (StatusCode::OK, "application/json", &b"hello"[..])
        );
        let (s, _, b) = body_of(http_response(br#"{"message":"hi"}"#, PayloadFormat::V2).unwrap());
        assert_eq!((s, &b[..]), (StatusCode::OK, &br#"{"message":"hi"}"#[..]));
        let full = br#"{"statusCode":201,"headers":{"content-type":"text/plain","x-a":"1"},"cookies":["a=1","b=2"],"body":"aGk=","isBase64Encoded":true}"#;
        let (s, h, b) = body_of(http_response(full, PayloadFormat::V2).unwrap());
        assert_eq!(s, StatusCode::CREATED);
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(h["x-a"], "1");
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);
        assert_eq!(&b[..], b"hi");
        assert!(http_response(b"not json", PayloadFormat::V2).is_none());
        assert!(http_response(br#"{"statusCode":99}"#, PayloadFormat::V2).is_none());
    }

    #[test]
    fn rest_responses_need_a_status_and_a_string_body() {
        let v1 = PayloadFormat::V1;
        assert!(http_response(br#""hello""#, v1).is_none());
        assert!(http_response(br#"{"message":"hi"}"#, v1).is_none());
        assert!(http_response(br#"{"statusCode":200,"body":{"a":1}}"#, v1).is_none());
        let full = br#"{"statusCode":202,"headers":{"x-a":"1","Set-Cookie":"lost=1"},"multiValueHeaders":{"set-cookie":["a=1","b=2"],"x-b":["1","2"]},"body":"aGk=","isBase64Encoded":true}"#;
        let (s, h, b) = body_of(http_response(full, v1).unwrap());
        assert_eq!(s, StatusCode::ACCEPTED);
        assert_eq!(h["x-a"], "1");
        let all = |name: &str| -> Vec<String> {
            h.get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(all("set-cookie"), ["a=1", "b=2"]);
        assert_eq!(all("x-b"), ["1", "2"]);
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(&b[..], b"hi");
        assert_eq!("1.0".parse::<PayloadFormat>(), Ok(PayloadFormat::V1));
        assert!("3"
            .parse::<PayloadFormat>()
            .unwrap_err()
            .contains("not a payload format"));
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
