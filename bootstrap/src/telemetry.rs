//! Lambda's Telemetry API (`PUT /2022-07-01/telemetry`) and its older alias, the Logs API
//! (`PUT /2020-08-15/logs`): an extension subscribes to the `platform`, `function` and
//! `extension` streams, and the agent POSTs them to the extension's HTTP listener in
//! batches (JSON arrays), as Lambda does.
//!
//! Delivery goes to `127.0.0.1:PORT` whatever name the destination gives (Lambda's
//! `sandbox.localdomain`, which the guest's `/etc/hosts` also names). Every subscriber's
//! queue is bounded ([`MAX_QUEUE_BYTES`], [`MAX_QUEUE_ITEMS`]): records that do not fit,
//! or that its listener did not take, are dropped and counted, and a `platform.logsDropped`
//! record heads its next batch. Nothing a function or extension does grows the agent
//! beyond these bounds times [`MAX_SUBSCRIBERS`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::CONTENT_TYPE;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// The Telemetry API's path, and the Logs API's.
pub const PATH_TELEMETRY: &str = "/2022-07-01/telemetry";
pub const PATH_LOGS_API: &str = "/2020-08-15/logs";

/// Bytes of records waiting for one subscriber past which new ones are dropped.
pub const MAX_QUEUE_BYTES: usize = 1 << 20;
/// Records waiting for one subscriber past which new ones are dropped.
const MAX_QUEUE_ITEMS: usize = 10_000;
/// Subscribers at most: one per extension, and Lambda allows ten extensions.
pub const MAX_SUBSCRIBERS: usize = 10;
/// A line longer than this is cut in its record (Lambda cuts records at 256 KiB).
const MAX_RECORD_TEXT: usize = 256 * 1024;
/// How long a listener may take to accept one batch.
const DELIVERY_PATIENCE: Duration = Duration::from_secs(5);
/// Init records kept for subscribers yet to come (extensions subscribe during init).
const MAX_EARLY: usize = 16;
/// Lambda's reason in `platform.logsDropped`.
const DROPPED_REASON: &str =
    "Consumer seems to have fallen behind as it has not acknowledged receipt of logs.";

/// The streams a subscriber may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    Platform,
    Function,
    Extension,
}

impl Category {
    fn parse(name: &str) -> Option<Category> {
        match name {
            "platform" => Some(Category::Platform),
            "function" => Some(Category::Function),
            "extension" => Some(Category::Extension),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Category::Platform => "platform",
            Category::Function => "function",
            Category::Extension => "extension",
        }
    }
}

/// Which API the subscription came through: their records differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Telemetry,
    Logs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Buffering {
    max_items: usize,
    max_bytes: usize,
    timeout: Duration,
}

/// One subscription, as the extension asked for it (both APIs share the shape).
#[derive(Debug, Deserialize)]
struct SubscribeRequest {
    #[serde(default)]
    types: Vec<String>,
    #[serde(default)]
    buffering: Option<BufferingRequest>,
    destination: Destination,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BufferingRequest {
    max_items: Option<u64>,
    max_bytes: Option<u64>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Destination {
    protocol: String,
    #[serde(rename = "URI")]
    uri: String,
}

/// A subscription that was validated: where to, what, how batched.
#[derive(Debug, PartialEq, Eq)]
struct Subscription {
    categories: Vec<Category>,
    buffering: Buffering,
    port: u16,
    path: String,
}

/// Checks a subscription as Lambda does (ranges of the buffering, an HTTP destination in
/// the sandbox); the error is the message of a 400.
fn validate(body: &[u8]) -> Result<Subscription, String> {
    let req: SubscribeRequest =
        serde_json::from_slice(body).map_err(|e| format!("invalid subscription: {e}"))?;
    let mut categories = Vec::new();
    for t in &req.types {
        let c = Category::parse(t).ok_or_else(|| format!("unknown type {t:?}"))?;
        if !categories.contains(&c) {
            categories.push(c);
        }
    }
    let b = req.buffering.unwrap_or(BufferingRequest {
        max_items: None,
        max_bytes: None,
        timeout_ms: None,
    });
    let ranged = |v: Option<u64>, default: u64, min: u64, max: u64, what: &str| {
        let v = v.unwrap_or(default);
        if (min..=max).contains(&v) {
            Ok(v)
        } else {
            Err(format!("buffering.{what} must be within [{min}, {max}]"))
        }
    };
    let max_items = ranged(b.max_items, 10_000, 1_000, 10_000, "maxItems")?;
    let max_bytes = ranged(b.max_bytes, 262_144, 262_144, 1_048_576, "maxBytes")?;
    let timeout_ms = ranged(b.timeout_ms, 1_000, 25, 30_000, "timeoutMs")?;
    if req.destination.protocol != "HTTP" {
        return Err(format!(
            "destination.protocol {:?} is not supported: use HTTP",
            req.destination.protocol
        ));
    }
    let (port, path) = sandbox_address(&req.destination.uri).ok_or_else(|| {
        format!(
            "destination.URI {:?} must be http://sandbox.localdomain:PORT/PATH",
            req.destination.uri
        )
    })?;
    Ok(Subscription {
        categories,
        buffering: Buffering {
            max_items: usize::try_from(max_items).unwrap_or(usize::MAX),
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            timeout: Duration::from_millis(timeout_ms),
        },
        port,
        path,
    })
}

/// The port and path of a listener in the sandbox (`http://sandbox.localdomain:PORT/…`;
/// `sandbox`, `localhost` and `127.0.0.1` name it too).
fn sandbox_address(uri: &str) -> Option<(u16, String)> {
    let uri: hyper::Uri = uri.parse().ok()?;
    if uri.scheme_str() != Some("http") {
        return None;
    }
    let host = uri.host()?;
    if !["sandbox.localdomain", "sandbox", "localhost", "127.0.0.1"].contains(&host) {
        return None;
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Some((uri.port_u16()?, path))
}

/// Records waiting for one subscriber.
#[derive(Default)]
struct Queue {
    records: VecDeque<Bytes>,
    bytes: usize,
    dropped_records: u64,
    dropped_bytes: u64,
    /// Deliver what waits now, without waiting for a fuller batch.
    flush: bool,
}

impl Queue {
    fn push(&mut self, record: Bytes) {
        if self.bytes + record.len() > MAX_QUEUE_BYTES || self.records.len() >= MAX_QUEUE_ITEMS {
            self.drop_records(1, record.len());
            return;
        }
        self.bytes += record.len();
        self.records.push_back(record);
    }

    fn drop_records(&mut self, records: u64, bytes: usize) {
        self.dropped_records = self.dropped_records.saturating_add(records);
        self.dropped_bytes = self
            .dropped_bytes
            .saturating_add(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    /// Whether a batch should go now.
    fn due(&self, buffering: &Buffering) -> bool {
        self.flush || self.records.len() >= buffering.max_items || self.bytes >= buffering.max_bytes
    }

    /// The next batch: a `platform.logsDropped` record first if anything was lost, then
    /// records up to the buffering's bounds (one at least).
    fn take_batch(&mut self, buffering: &Buffering, api: Api) -> Vec<Bytes> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        if self.dropped_records > 0 {
            let record = json!({
                "reason": DROPPED_REASON,
                "droppedRecords": self.dropped_records,
                "droppedBytes": self.dropped_bytes,
            });
            batch.extend(encode(api, "platform.logsDropped", &record));
            self.dropped_records = 0;
            self.dropped_bytes = 0;
        }
        while let Some(next) = self.records.front() {
            if !batch.is_empty()
                && (batch.len() >= buffering.max_items || bytes + next.len() > buffering.max_bytes)
            {
                break;
            }
            let next = self.records.pop_front().expect("just looked");
            self.bytes -= next.len();
            bytes += next.len();
            batch.push(next);
        }
        if self.records.is_empty() {
            self.flush = false;
        }
        batch
    }
}

struct Subscriber {
    extension_id: String,
    api: Api,
    subscription: Subscription,
    queue: Mutex<Queue>,
    wake: Notify,
    /// Signalled when its queue is empty and nothing is being delivered.
    idle: Notify,
    /// Replaced by a newer subscription of the same extension: its task ends.
    retired: AtomicBool,
}

impl Subscriber {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wants(&self, category: Category) -> bool {
        self.subscription.categories.contains(&category)
    }

    fn push(&self, kind: &str, record: &Value) {
        let mut queue = self.queue();
        for r in encode(self.api, kind, record) {
            queue.push(r);
        }
        drop(queue);
        self.wake.notify_one();
    }

    /// Delivers batches until it is replaced.
    async fn deliver(self: Arc<Self>) {
        let buffering = self.subscription.buffering;
        loop {
            // Wait for the first record, then for a full batch or the buffering's timeout.
            loop {
                let woken = self.wake.notified();
                if self.retired.load(Ordering::Relaxed) {
                    return;
                }
                // A loss is told with the next record, not alone: a listener that is
                // gone is not retried for ever.
                if !self.queue().records.is_empty() {
                    break;
                }
                self.idle.notify_waiters();
                woken.await;
            }
            let until = tokio::time::Instant::now() + buffering.timeout;
            loop {
                let woken = self.wake.notified();
                if self.queue().due(&buffering) {
                    break;
                }
                if tokio::time::timeout_at(until, woken).await.is_err() {
                    break;
                }
            }
            let batch = self.queue().take_batch(&buffering, self.api);
            if batch.is_empty() {
                continue;
            }
            let bytes: usize = batch.iter().map(Bytes::len).sum();
            let count = u64::try_from(batch.len()).unwrap_or(u64::MAX);
            if let Err(e) = post(self.subscription.port, &self.subscription.path, batch).await {
                say!(
                    "telemetry for extension {}: {count} records lost: {e}",
                    self.extension_id
                );
                self.queue().drop_records(count, bytes);
            }
        }
    }
}

/// POSTs one batch (a JSON array of the records) to `127.0.0.1:port` at `path`.
async fn post(port: u16, path: &str, batch: Vec<Bytes>) -> Result<(), String> {
    let mut body =
        Vec::with_capacity(batch.iter().map(Bytes::len).sum::<usize>() + batch.len() + 1);
    body.push(b'[');
    for (i, record) in batch.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(record);
    }
    body.push(b']');
    let exchange = async {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect to port {port}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::post(path)
            .header(hyper::header::HOST, format!("sandbox.localdomain:{port}"))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        // Read (and bound) the answer, so the listener sees its reply was taken.
        let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the listener answered {status}"))
        }
    };
    tokio::time::timeout(DELIVERY_PATIENCE, exchange)
        .await
        .map_err(|_| format!("no answer within {DELIVERY_PATIENCE:?}"))?
}

/// A record in a subscriber's format: the Telemetry API's, or the Logs API's (which
/// knows no init records, calls the subscription `platform.logsSubscription`, has
/// `platform.end` after `platform.runtimeDone`, and no `status` in reports).
fn encode(api: Api, kind: &str, record: &Value) -> Vec<Bytes> {
    let time = timestamp(SystemTime::now());
    let one = |kind: &str, record: &Value| {
        Bytes::from(json!({"time": time, "type": kind, "record": record}).to_string())
    };
    if api == Api::Telemetry {
        return vec![one(kind, record)];
    }
    match kind {
        "platform.initStart" | "platform.initRuntimeDone" | "platform.initReport" => Vec::new(),
        "platform.telemetrySubscription" => vec![one("platform.logsSubscription", record)],
        "platform.runtimeDone" => vec![
            one(
                kind,
                &json!({"requestId": record["requestId"], "status": record["status"]}),
            ),
            one("platform.end", &json!({"requestId": record["requestId"]})),
        ],
        "platform.report" => vec![one(
            kind,
            &json!({"requestId": record["requestId"], "metrics": record["metrics"]}),
        )],
        _ => vec![one(kind, record)],
    }
}

/// `2022-10-12T00:03:50.000Z`: UTC, milliseconds.
pub fn timestamp(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Every subscription of this environment.
#[derive(Default)]
pub struct Telemetry {
    subscribers: Mutex<Vec<Arc<Subscriber>>>,
    /// Whether anyone subscribed: lines cost nothing more until then.
    any: AtomicBool,
    /// `platform.init*` records from before the first subscription, replayed to each
    /// subscriber (Lambda's subscribers see the init they subscribed during).
    early: Mutex<Vec<(String, Value)>>,
}

impl Telemetry {
    fn subscribers(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Subscriber>>> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes extension `extension_id` (named `name`), replacing its earlier
    /// subscription; the error is the message of a 400.
    pub fn subscribe(
        &self,
        api: Api,
        extension_id: &str,
        name: &str,
        body: &[u8],
    ) -> Result<(), String> {
        let subscription = validate(body)?;
        let types: Vec<&str> = subscription.categories.iter().map(|c| c.name()).collect();
        let confirmation = json!({"name": name, "state": "Subscribed", "types": types});
        let subscriber = Arc::new(Subscriber {
            extension_id: extension_id.to_owned(),
            api,
            subscription,
            queue: Mutex::default(),
            wake: Notify::new(),
            idle: Notify::new(),
            retired: AtomicBool::new(false),
        });
        {
            let mut subscribers = self.subscribers();
            if let Some(i) = subscribers
                .iter()
                .position(|s| s.extension_id == extension_id)
            {
                let old = subscribers.swap_remove(i);
                old.retired.store(true, Ordering::Relaxed);
                old.wake.notify_one();
            }
            if subscribers.len() >= MAX_SUBSCRIBERS {
                return Err(format!("at most {MAX_SUBSCRIBERS} subscriptions"));
            }
            subscribers.push(subscriber.clone());
        }
        self.any.store(true, Ordering::Relaxed);
        if subscriber.wants(Category::Platform) {
            subscriber.push("platform.telemetrySubscription", &confirmation);
            let early = self.early.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for (kind, record) in early {
                subscriber.push(&kind, &record);
            }
        }
        tokio::spawn(subscriber.deliver());
        Ok(())
    }

    /// A platform record of type `kind` for every subscriber of `platform`.
    pub fn platform(&self, kind: &str, record: impl FnOnce() -> Value) {
        if !self.any.load(Ordering::Relaxed) {
            if kind.starts_with("platform.init") {
                let mut early = self.early.lock().unwrap_or_else(|e| e.into_inner());
                if early.len() < MAX_EARLY {
                    early.push((kind.to_owned(), record()));
                }
            }
            return;
        }
        let subscribers: Vec<Arc<Subscriber>> = self
            .subscribers()
            .iter()
            .filter(|s| s.wants(Category::Platform))
            .cloned()
            .collect();
        if subscribers.is_empty() {
            return;
        }
        let record = record();
        for s in subscribers {
            s.push(kind, &record);
        }
    }

    /// One line of output of the function (`Function`) or an extension (`Extension`).
    pub fn line(&self, category: Category, line: &[u8]) {
        if !self.any.load(Ordering::Relaxed) {
            return;
        }
        let subscribers: Vec<Arc<Subscriber>> = self
            .subscribers()
            .iter()
            .filter(|s| s.wants(category))
            .cloned()
            .collect();
        if subscribers.is_empty() {
            return;
        }
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = &line[..line.len().min(MAX_RECORD_TEXT)];
        let text = Value::from(String::from_utf8_lossy(line));
        for s in subscribers {
            s.push(category.name(), &text);
        }
    }

    /// Delivers everything waiting now (shutdown), returning when every queue is empty.
    pub async fn flush(&self) {
        let subscribers: Vec<Arc<Subscriber>> = self.subscribers().clone();
        for s in subscribers {
            loop {
                let idle = s.idle.notified();
                {
                    let mut queue = s.queue();
                    if queue.records.is_empty() {
                        break;
                    }
                    queue.flush = true;
                }
                s.wake.notify_one();
                idle.await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscription(buffering: &str, uri: &str) -> Result<Subscription, String> {
        validate(
            format!(
                r#"{{"schemaVersion":"2022-12-13","types":["platform","function"],
                    "buffering":{buffering},"destination":{{"protocol":"HTTP","URI":"{uri}"}}}}"#
            )
            .as_bytes(),
        )
    }

    #[test]
    fn subscriptions_are_checked_as_lambda_does() {
        let ok = subscription(
            r#"{"maxItems":1000,"maxBytes":262144,"timeoutMs":25}"#,
            "http://sandbox.localdomain:4243/telemetry",
        )
        .unwrap();
        assert_eq!((ok.port, ok.path.as_str()), (4243, "/telemetry"));
        assert_eq!(ok.categories, [Category::Platform, Category::Function]);
        assert_eq!(ok.buffering.timeout, Duration::from_millis(25));
        for (buffering, uri, error) in [
            (r#"{"timeoutMs":10}"#, "http://sandbox:1/", "timeoutMs"),
            (r#"{"maxItems":10}"#, "http://sandbox:1/", "maxItems"),
            (r#"{"maxBytes":10}"#, "http://sandbox:1/", "maxBytes"),
            ("{}", "http://example.com:1/", "must be http://sandbox"),
            ("{}", "http://sandbox/", "must be http://sandbox"),
            ("{}", "https://sandbox:1/", "must be http://sandbox"),
        ] {
            let e = subscription(buffering, uri).unwrap_err();
            assert!(e.contains(error), "{buffering} {uri}: {e}");
        }
        assert!(validate(
            br#"{"types":["nope"],"destination":{"protocol":"HTTP","URI":"http://sandbox:1"}}"#
        )
        .is_err());
        assert!(
            validate(br#"{"destination":{"protocol":"TCP","URI":"http://sandbox:1"}}"#).is_err()
        );
    }

    #[test]
    fn a_full_queue_drops_and_the_next_batch_says_how_much() {
        let buffering = Buffering {
            max_items: 1000,
            max_bytes: 262_144,
            timeout: Duration::from_millis(25),
        };
        let mut queue = Queue::default();
        let record = Bytes::from(vec![b'x'; 1024]);
        for _ in 0..(MAX_QUEUE_BYTES / 1024 + 10) {
            queue.push(record.clone());
        }
        assert_eq!(queue.bytes, MAX_QUEUE_BYTES);
        assert_eq!(
            (queue.dropped_records, queue.dropped_bytes),
            (10, 10 * 1024)
        );
        let batch = queue.take_batch(&buffering, Api::Telemetry);
        let first: Value = serde_json::from_slice(&batch[0]).unwrap();
        assert_eq!(first["type"], "platform.logsDropped");
        assert_eq!(first["record"]["droppedRecords"], 10);
        // The batch respects maxBytes: 255 records of 1 KiB fit beside the first.
        assert!(batch[1..].iter().map(Bytes::len).sum::<usize>() <= 262_144);
        assert_eq!(queue.dropped_records, 0);
    }

    #[test]
    fn logs_api_records_are_the_older_format() {
        let done = json!({"requestId": "r1", "status": "success", "metrics": {"durationMs": 1.0}});
        let records: Vec<Value> = encode(Api::Logs, "platform.runtimeDone", &done)
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect();
        assert_eq!(
            records[0]["record"],
            json!({"requestId": "r1", "status": "success"})
        );
        assert_eq!(records[1]["type"], "platform.end");
        assert!(encode(Api::Logs, "platform.initStart", &json!({})).is_empty());
        assert_eq!(
            encode(Api::Telemetry, "platform.initStart", &json!({})).len(),
            1
        );
    }

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        let at = UNIX_EPOCH + Duration::from_millis(1_665_533_030_123);
        assert_eq!(timestamp(at), "2022-10-12T00:03:50.123Z");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000Z");
    }
}
