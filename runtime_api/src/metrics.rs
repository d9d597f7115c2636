//! Prometheus metrics served at `GET /metrics` on the Invoke API port.
//!
//! Counters and histograms are labelled by function so that one scrape shows which
//! function is slow, failing or cold-starting.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabel {
    function: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    function: String,
    phase: String,
}

type Seconds = Family<FunctionLabel, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 100 µs .. ~100 s: covers a warm sandbox invoke and a TCG microVM boot alike.
    Histogram::new(exponential_buckets(0.0001, 2.5, 16))
}

/// All of the server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    invocations: Family<FunctionLabel, Counter>,
    errors: Family<FunctionLabel, Counter>,
    timeouts: Family<FunctionLabel, Counter>,
    cold_starts: Family<FunctionLabel, Counter>,
    freezes: Family<FunctionLabel, Counter>,
    thaw_seconds: Seconds,
    cold_start_seconds: Seconds,
    init_seconds: Seconds,
    duration_seconds: Seconds,
    start_phase_seconds: Family<PhaseLabel, Histogram, fn() -> Histogram>,
    event_queue_depth: Family<FunctionLabel, Gauge>,
    event_queue_oldest_age_seconds: Family<FunctionLabel, Gauge>,
    event_retries: Family<FunctionLabel, Counter>,
    events_dropped: Family<FunctionLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kindling");
        let invocations = Family::default();
        let errors = Family::default();
        let timeouts = Family::default();
        let cold_starts = Family::default();
        let freezes = Family::default();
        let histogram = || Seconds::new_with_constructor(seconds_histogram);
        let (cold_start_seconds, init_seconds, duration_seconds, thaw_seconds) =
            (histogram(), histogram(), histogram(), histogram());
        registry.register("invocations", "Invocations run", invocations.clone());
        registry.register(
            "errors",
            "Invocations that ended in an error (function, init, crash or timeout)",
            errors.clone(),
        );
        registry.register(
            "timeouts",
            "Invocations that ran past the function's timeout",
            timeouts.clone(),
        );
        registry.register(
            "cold_starts",
            "Environments started for an invocation",
            cold_starts.clone(),
        );
        registry.register(
            "freezes",
            "Idle environments frozen (paused) until their next invocation",
            freezes.clone(),
        );
        registry.register(
            "thaw_seconds",
            "Thawing a frozen environment for an invocation, on the invoke path",
            thaw_seconds.clone(),
        );
        registry.register(
            "cold_start_seconds",
            "Environment start until its runtime's first /next, measured on the host",
            cold_start_seconds.clone(),
        );
        registry.register(
            "init_seconds",
            "Runtime init duration reported by the guest",
            init_seconds.clone(),
        );
        let start_phase_seconds =
            Family::new_with_constructor(seconds_histogram as fn() -> Histogram);
        registry.register(
            "start_phase_seconds",
            "Phases of an environment's start (hypervisor start, guest boot, ...), measured by the environment",
            start_phase_seconds.clone(),
        );
        registry.register(
            "duration_seconds",
            "Invocation duration reported by the guest",
            duration_seconds.clone(),
        );
        let (event_queue_depth, event_queue_oldest_age_seconds) =
            (Family::default(), Family::default());
        let (event_retries, events_dropped) = (Family::default(), Family::default());
        registry.register(
            "event_queue_depth",
            "Event invocations accepted and not yet finished (on disk)",
            event_queue_depth.clone(),
        );
        registry.register(
            "event_queue_oldest_age_seconds",
            "Age of the oldest Event invocation not yet finished",
            event_queue_oldest_age_seconds.clone(),
        );
        registry.register(
            "event_retries",
            "Event invocations retried after a failed attempt",
            event_retries.clone(),
        );
        registry.register(
            "events_dropped",
            "Event invocations given up (retries exhausted or too old), sent to the on-failure destination if any",
            events_dropped.clone(),
        );
        Self {
            registry,
            event_queue_depth,
            event_queue_oldest_age_seconds,
            event_retries,
            events_dropped,
            invocations,
            errors,
            timeouts,
            cold_starts,
            freezes,
            thaw_seconds,
            cold_start_seconds,
            init_seconds,
            duration_seconds,
            start_phase_seconds,
        }
    }
}

fn label(function: &str) -> FunctionLabel {
    FunctionLabel {
        function: function.to_string(),
    }
}

impl Metrics {
    pub fn invocation(&self, function: &str) {
        self.invocations.get_or_create(&label(function)).inc();
    }
    pub fn error(&self, function: &str) {
        self.errors.get_or_create(&label(function)).inc();
    }
    pub fn timeout(&self, function: &str) {
        self.timeouts.get_or_create(&label(function)).inc();
    }
    /// An invocation that had to start its environment.
    pub fn cold_start(&self, function: &str) {
        self.cold_starts.get_or_create(&label(function)).inc();
    }
    /// An idle environment frozen.
    pub fn freeze(&self, function: &str) {
        self.freezes.get_or_create(&label(function)).inc();
    }
    /// A frozen environment thawed for an invocation.
    pub fn thaw_took(&self, function: &str, took: Duration) {
        self.thaw_seconds
            .get_or_create(&label(function))
            .observe(took.as_secs_f64());
    }
    /// Environment start until its runtime took the first event.
    pub fn cold_start_took(&self, function: &str, took: Duration) {
        self.cold_start_seconds
            .get_or_create(&label(function))
            .observe(took.as_secs_f64());
    }
    /// One phase of an environment's start (see `Environment::start_phases`).
    pub fn start_phase(&self, function: &str, phase: &str, took: Duration) {
        let label = PhaseLabel {
            function: function.to_string(),
            phase: phase.to_string(),
        };
        self.start_phase_seconds
            .get_or_create(&label)
            .observe(took.as_secs_f64());
    }
    pub fn init(&self, function: &str, ms: f64) {
        self.init_seconds
            .get_or_create(&label(function))
            .observe(ms / 1000.0);
    }
    pub fn duration(&self, function: &str, ms: f64) {
        self.duration_seconds
            .get_or_create(&label(function))
            .observe(ms / 1000.0);
    }

    /// A failed Event attempt that will be retried.
    pub fn event_retry(&self, function: &str) {
        self.event_retries.get_or_create(&label(function)).inc();
    }
    /// An Event given up.
    pub fn event_dropped(&self, function: &str) {
        self.events_dropped.get_or_create(&label(function)).inc();
    }
    /// The event queue as it stands: per function, its depth and the oldest event's
    /// acceptance (Unix ms); functions not listed have none.
    pub fn event_queue(&self, queued: &[(String, usize, i64)], now_ms: i64) {
        self.event_queue_depth.clear();
        self.event_queue_oldest_age_seconds.clear();
        for (function, depth, oldest_ms) in queued {
            self.event_queue_depth
                .get_or_create(&label(function))
                .set(i64::try_from(*depth).unwrap_or(i64::MAX));
            self.event_queue_oldest_age_seconds
                .get_or_create(&label(function))
                .set((now_ms - oldest_ms).max(0) / 1000);
        }
    }

    /// The text exposition (OpenMetrics, which Prometheus reads).
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
