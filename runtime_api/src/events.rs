//! Durable asynchronous invocations (`InvocationType: Event`), as Lambda runs them.
//!
//! An event keeps the version or alias it was sent to; each attempt runs the version that
//! names then (an alias moved meanwhile runs its new version), and an event whose version
//! or alias is gone is dropped. The function's event-invoke configuration applies to all
//! of its versions.
//!
//! An event is written to the [`Store`] before the caller gets its 202, so nothing
//! accepted is lost by a crash: a restarted server resumes the queue where it stood. The
//! dispatcher runs each due event once; its row goes only when the attempt is over (a
//! crash in between runs it again, at least once, as Lambda). A failed attempt (function
//! error, timeout, crash) is retried up to the function's `MaximumRetryAttempts` (default
//! 2), after `retry_base` and then twice that (Lambda: one minute, then two); an event
//! that could not run at all (no environment would start: the service's error) is tried
//! again every `retry_base` without counting an attempt; an event older than
//! `MaximumEventAgeInSeconds` is dropped. The outcome goes to the function's on-success or on-failure destination:
//! another function (queued in the same transaction that removes the event) or a JSON
//! Lines file `<state-dir>/destinations/<name>.jsonl` for an SQS queue or SNS topic ARN,
//! each record in Lambda's destination format. A record bound for a file is first kept
//! with the event: a crash before the event is removed appends it again (at least once),
//! but never runs a finished event again.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::metrics::Metrics;
use crate::scheduler::{until_true, Answer, InvokeError, InvokeRequest, Scheduler, VERSION};
use crate::store::{EnqueueError, EventInvokeConfig, QueueBounds, Store, StoredEvent};

/// Attempts running at once, all functions together: what their payloads hold in memory
/// stays bounded (at most this many MB). Each function also has at most as many as its
/// environments, so that one function's backlog never holds up another's events.
const MAX_IN_FLIGHT: usize = 64;
/// The dispatcher looks at the database at least this often (retries fall due).
const POLL: Duration = Duration::from_secs(1);

/// How the queue runs.
#[derive(Debug, Clone, Copy)]
pub struct EventQueueOptions {
    /// Per function, events accepted and not yet finished, and their payloads' bytes.
    pub bounds: QueueBounds,
    /// Wait before the first retry; the second waits twice as long (Lambda: 1 minute).
    pub retry_base: Duration,
}

impl Default for EventQueueOptions {
    fn default() -> Self {
        Self {
            bounds: QueueBounds {
                events: 100,
                bytes: 16 << 20,
            },
            retry_base: Duration::from_secs(60),
        }
    }
}

pub(crate) struct EventQueue {
    store: Arc<Store>,
    scheduler: Arc<Scheduler>,
    metrics: Arc<Metrics>,
    options: EventQueueOptions,
    destinations: PathBuf,
    /// Rows being attempted now, and their functions: the dispatcher does not take them
    /// again.
    running: Mutex<HashMap<i64, String>>,
    wake: Notify,
}

/// Why an outcome goes to a destination, in Lambda's words.
#[derive(Clone, Copy)]
enum Condition {
    Success,
    RetriesExhausted,
    EventAgeExceeded,
}

impl Condition {
    fn name(self) -> &'static str {
        match self {
            Condition::Success => "Success",
            Condition::RetriesExhausted => "RetriesExhausted",
            Condition::EventAgeExceeded => "EventAgeExceeded",
        }
    }
}

/// Where a destination ARN delivers.
enum Destination {
    Function(String),
    File(String),
}

/// Checks a destination ARN: a Lambda function, an SQS queue or an SNS topic (the
/// latter two are JSON Lines files here).
pub(crate) fn check_destination(arn: &str) -> Result<(), String> {
    parse_destination(arn).map(|_| ())
}

fn parse_destination(arn: &str) -> Result<Destination, String> {
    let parts: Vec<&str> = arn.split(':').collect();
    let name_ok = |n: &str, max: usize| {
        (1..=max).contains(&n.len())
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    match parts.as_slice() {
        ["arn", _, "lambda", _, _, "function", name] if name_ok(name, 64) => {
            Ok(Destination::Function(name.to_string()))
        }
        ["arn", _, "sqs" | "sns", _, _, name] if name_ok(name, 80) => {
            Ok(Destination::File(name.to_string()))
        }
        _ => Err(format!(
            "{arn} is not a destination this server delivers to: use a Lambda function, SQS queue or SNS topic ARN (queues and topics are JSON Lines files in <state-dir>/destinations)"
        )),
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl EventQueue {
    pub(crate) fn new(
        store: Arc<Store>,
        scheduler: Arc<Scheduler>,
        metrics: Arc<Metrics>,
        options: EventQueueOptions,
        destinations: PathBuf,
    ) -> Self {
        Self {
            store,
            scheduler,
            metrics,
            options,
            destinations,
            running: Mutex::default(),
            wake: Notify::new(),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<i64, String>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts an event for `function`: durable once this returns. The request id is the
    /// one the function sees, on every attempt. The commit waits for the disk, off the
    /// runtime's threads.
    pub(crate) async fn accept(
        &self,
        function: &str,
        qualifier: Option<&str>,
        request: &InvokeRequest,
    ) -> Result<String, EnqueueError> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        let event = StoredEvent {
            seq: 0,
            request_id: request_id.clone(),
            function: function.to_string(),
            qualifier: qualifier.map(str::to_string),
            payload: request.payload.to_vec(),
            trace_id: request.trace_id.clone(),
            client_context: request.client_context.clone(),
            accepted_ms: now,
            attempts: 0,
            settled: None,
        };
        let (store, bounds) = (self.store.clone(), self.options.bounds);
        tokio::task::spawn_blocking(move || store.enqueue(&event, now, bounds))
            .await
            .map_err(|e| EnqueueError::Store(anyhow::anyhow!("the commit task failed: {e}")))??;
        self.wake.notify_one();
        Ok(request_id)
    }

    /// Runs due events until `stop`, then waits for the attempts in progress (the
    /// scheduler's shutdown ends them; one cut short stays queued for the next start).
    pub(crate) async fn dispatch(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut attempts = JoinSet::new();
        loop {
            let wait = match self.dispatch_due(&mut attempts) {
                Ok(wait) => wait,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "the event queue cannot read the database");
                    POLL
                }
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                Some(_) = attempts.join_next(), if !attempts.is_empty() => {}
                _ = until_true(&mut stop) => break,
            }
        }
        while attempts.join_next().await.is_some() {}
    }

    /// Starts every due event not yet running; how long until the next one falls due.
    fn dispatch_due(self: &Arc<Self>, attempts: &mut JoinSet<()>) -> anyhow::Result<Duration> {
        let now = now_ms();
        let due = {
            let running = self.running();
            let mut per_function: HashMap<String, usize> = HashMap::new();
            for function in running.values() {
                *per_function.entry(function.clone()).or_default() += 1;
            }
            let mut total = running.len();
            self.store.due_events(now, &mut |seq, function| {
                if running.contains_key(&seq) || total >= MAX_IN_FLIGHT {
                    return false;
                }
                let cap = self
                    .scheduler
                    .resolve(function, VERSION)
                    .map_or(1, |f| f.max_concurrency);
                let n = per_function.entry(function.to_string()).or_default();
                if *n >= cap {
                    return false;
                }
                *n += 1;
                total += 1;
                true
            })?
        };
        for event in due {
            self.running().insert(event.seq, event.function.clone());
            let queue = self.clone();
            attempts.spawn(async move {
                let seq = event.seq;
                if let Err(e) = queue.attempt(event).await {
                    tracing::error!(error = %format!("{e:#}"), "an event's outcome could not be recorded: it runs again");
                }
                queue.running().remove(&seq);
                queue.wake.notify_one();
            });
        }
        // Due events left waiting for a free slot are taken when an attempt ends (it
        // wakes the dispatcher).
        let next = self.store.next_due_ms(now)?;
        Ok(next.map_or(POLL, |at| {
            Duration::from_millis(u64::try_from(at - now).unwrap_or(0)).min(POLL)
        }))
    }

    /// One attempt of one event, and what follows from its outcome; for an event whose
    /// attempts were over before a crash, only the delivery of its record.
    async fn attempt(&self, event: StoredEvent) -> anyhow::Result<()> {
        if let Some((file, record)) = &event.settled {
            self.append_line(file, record)?;
            return self.store.finish_event(event.seq, None);
        }
        let record = self.store.function(&event.function)?;
        let Some(record) = record else {
            tracing::warn!(function = %event.function, request_id = %event.request_id, "event dropped: its function no longer exists");
            return self.store.finish_event(event.seq, None);
        };
        let config = record.event_invoke.unwrap_or_default();
        let version = self
            .store
            .resolve_qualifier(&event.function, event.qualifier.as_deref())?;
        let Some(version) = version else {
            tracing::warn!(function = %event.function, qualifier = ?event.qualifier, request_id = %event.request_id, "event dropped: its version or alias no longer exists");
            return self.store.finish_event(event.seq, None);
        };
        let age = now_ms() - event.accepted_ms;
        if age > i64::from(config.maximum_event_age_s) * 1000 {
            self.metrics.event_dropped(&event.function);
            tracing::warn!(function = %event.function, request_id = %event.request_id, "event dropped: older than MaximumEventAgeInSeconds");
            return self.conclude(&event, &config, Condition::EventAgeExceeded, None, &version);
        }
        let request = InvokeRequest {
            payload: event.payload.clone().into(),
            client_context: event.client_context.clone(),
            cognito_identity: None,
            trace_id: event.trace_id.clone(),
            request_id: Some(event.request_id.clone()),
            qualifier: event.qualifier.clone(),
        };
        let result = self
            .scheduler
            .invoke(&event.function, &version, request, true)
            .await;
        let response = match result {
            // Not the function's failure: the event runs again after the restart.
            Ok(invoked) if invoked.cut_short => return Ok(()),
            Err(InvokeError::ShuttingDown) => return Ok(()),
            Ok(invoked) => invoked.answer,
            Err(e) => {
                // The service's failure (no environment could start), not the function's:
                // as Lambda does with its system errors, the event goes back to the queue
                // without counting an attempt; MaximumEventAgeInSeconds still ends it.
                tracing::warn!(function = %event.function, request_id = %event.request_id, error = %format!("{:#}", anyhow::Error::new(e)), wait = ?self.options.retry_base, "event not run: tried again later, not counted as an attempt");
                return self.store.retry_event(
                    event.seq,
                    event.attempts,
                    now_ms().saturating_add(ms(self.options.retry_base)),
                );
            }
        };
        let attempts = event.attempts + 1;
        match &response {
            Answer::Response(_) => self.conclude(
                &event.with_attempts(attempts),
                &config,
                Condition::Success,
                Some(&response),
                &version,
            ),
            Answer::Error { error_type, .. } if attempts > config.maximum_retry_attempts => {
                tracing::warn!(function = %event.function, request_id = %event.request_id, %error_type, attempts, "event failed: retries exhausted");
                self.metrics.event_dropped(&event.function);
                self.conclude(
                    &event.with_attempts(attempts),
                    &config,
                    Condition::RetriesExhausted,
                    Some(&response),
                    &version,
                )
            }
            Answer::Error { error_type, .. } => {
                let wait = self.options.retry_base * attempts;
                tracing::info!(function = %event.function, request_id = %event.request_id, %error_type, attempts, ?wait, "event failed: retrying");
                self.metrics.event_retry(&event.function);
                self.store
                    .retry_event(event.seq, attempts, now_ms().saturating_add(ms(wait)))
            }
        }
    }

    /// Delivers the outcome of `event` (run as `version`) to its destination (if one is
    /// configured) and removes the event. A file destination is written first: a crash
    /// in between delivers twice rather than never.
    fn conclude(
        &self,
        event: &StoredEvent,
        config: &EventInvokeConfig,
        condition: Condition,
        response: Option<&Answer>,
        version: &str,
    ) -> anyhow::Result<()> {
        let target = match condition {
            Condition::Success => &config.on_success,
            Condition::RetriesExhausted | Condition::EventAgeExceeded => &config.on_failure,
        };
        let Some(arn) = target else {
            return self.store.finish_event(event.seq, None);
        };
        let record = self.destination_record(event, condition, response, version);
        match parse_destination(arn).map_err(anyhow::Error::msg)? {
            Destination::File(name) => {
                let record = record.to_string();
                self.store.settle_event(event.seq, &name, &record)?;
                self.append_line(&name, &record)?;
                self.store.finish_event(event.seq, None)
            }
            Destination::Function(name) => {
                let now = now_ms();
                let next = StoredEvent {
                    seq: 0,
                    request_id: uuid::Uuid::new_v4().to_string(),
                    function: name,
                    qualifier: None,
                    payload: record.to_string().into_bytes(),
                    trace_id: None,
                    client_context: None,
                    accepted_ms: now,
                    attempts: 0,
                    settled: None,
                };
                self.store.finish_event(event.seq, Some((&next, now)))
            }
        }
    }

    fn append_line(&self, name: &str, record: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.destinations)?;
        let path = self.destinations.join(format!("{name}.jsonl"));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let mut line = record.to_string();
        line.push('\n');
        file.write_all(line.as_bytes())?;
        file.sync_data()?;
        Ok(())
    }

    /// Lambda's destination record: `requestContext`, `requestPayload`, and (after an
    /// attempt) `responseContext` and `responsePayload`.
    fn destination_record(
        &self,
        event: &StoredEvent,
        condition: Condition,
        response: Option<&Answer>,
        version: &str,
    ) -> Value {
        let qualifier = event.qualifier.as_deref().unwrap_or(VERSION);
        let mut record = json!({
            "version": "1.0",
            "timestamp": crate::scheduler::timestamp(),
            "requestContext": {
                "requestId": event.request_id,
                "functionArn": format!("{}:{qualifier}", self.scheduler.arn(&event.function)),
                "condition": condition.name(),
                "approximateInvokeCount": event.attempts,
            },
            "requestPayload": as_json(&event.payload),
        });
        if let Some(answer) = response {
            let (body, error) = match answer {
                Answer::Response(body) => (body, false),
                Answer::Error { body, .. } => (body, true),
            };
            let mut context = json!({"statusCode": 200, "executedVersion": version});
            if error {
                context["functionError"] = json!("Unhandled");
            }
            record["responseContext"] = context;
            record["responsePayload"] = as_json(body);
        }
        record
    }

    /// Sets the queue's gauges in `/metrics` from the database.
    pub(crate) fn observe(&self) {
        match self.store.queue_stats() {
            Ok(stats) => self.metrics.event_queue(&stats, now_ms()),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the event queue's size")
            }
        }
    }
}

impl StoredEvent {
    fn with_attempts(&self, attempts: u32) -> StoredEvent {
        StoredEvent {
            attempts,
            ..self.clone()
        }
    }
}

/// A payload as JSON when it is, else as a string.
fn as_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_functions_queues_or_topics() {
        assert!(matches!(
            parse_destination("arn:aws:lambda:us-east-1:000000000000:function:dlq"),
            Ok(Destination::Function(n)) if n == "dlq"
        ));
        assert!(matches!(
            parse_destination("arn:aws:sqs:us-east-1:000000000000:failed-events"),
            Ok(Destination::File(n)) if n == "failed-events"
        ));
        assert!(matches!(
            parse_destination("arn:aws:sns:us-east-1:000000000000:t"),
            Ok(Destination::File(_))
        ));
        for bad in [
            "arn:aws:sqs:us-east-1:000000000000:../x",
            "arn:aws:s3:::bucket",
            "dlq",
            "arn:aws:lambda:us-east-1:000000000000:function:f:2",
        ] {
            assert!(parse_destination(bad).is_err(), "{bad}");
        }
    }
}
