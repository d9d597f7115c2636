//! The agent's view of one runtime's life: when it started, whether it reached its first
//! `/next`, which invocation it is working on and since when. The relay calls in here at
//! each step of the Runtime API; the supervisor when the runtime starts and exits. Each
//! step is also told to the extensions and the Telemetry API's subscribers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::header::HeaderMap;
use kindling_wire::{
    monotonic_ns, ErrorBody, FunctionEnvironment, InvocationReport, MemoryUse, RuntimeExit,
    HEADER_DEADLINE_MS, HEADER_FUNCTION_ARN, HEADER_TRACE_ID, PATH_INIT_ERROR, PATH_MEMORY,
    PATH_RUNTIME_EXIT,
};
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::extensions::Extensions;
use crate::logs::LogSink;
use crate::memory::{self, MemoryProbe};
use crate::telemetry::Telemetry;
use crate::upstream::Upstream;

/// How often a microVM's agent reports the runtime's peak memory during an invocation.
const MEMORY_REPORT_EVERY: Duration = Duration::from_millis(500);

struct Running {
    started: Instant,
    /// `started` on [`monotonic_ns`], for the first report.
    started_ns: u64,
    /// The kernel's OOM-kill count when the runtime started.
    oom_kills_at_start: Option<u64>,
    memory: Arc<MemoryProbe>,
    /// Init duration, set at the first `/next` and taken by the first report.
    init_ms: Option<f64>,
    reached_next: bool,
}

struct InFlight {
    id: String,
    handed_over: Instant,
    /// The invocation's deadline: extensions still busy then reset the environment.
    deadline: Option<Instant>,
    /// [`monotonic_ns`] at the hand-over, for the per-hop stamps.
    event_in_ns: u64,
}

/// An invocation the runtime answered, until the extensions are done with it too.
struct Answered {
    id: String,
    handed_over: Instant,
    deadline: Option<Instant>,
    status: &'static str,
    report: Option<InvocationReport>,
}

#[derive(Default)]
struct Lifecycle {
    runtime: Option<Running>,
    in_flight: Option<InFlight>,
    answered: Option<Answered>,
    /// Why the environment must be reset, once it must.
    reset: Option<String>,
    /// When the agent's process started ([`monotonic_ns`]), until the first report.
    agent_started_ns: Option<u64>,
}

pub struct Agent {
    pub upstream: Upstream,
    pub logs: Arc<LogSink>,
    pub extensions: Extensions,
    pub telemetry: Arc<Telemetry>,
    /// `initializationType`, `memorySizeMB` and the version, for telemetry.
    function: FunctionEnvironment,
    reset: Notify,
    /// Whether this agent runs in a microVM, whose kernel is its own (a sandbox shares the
    /// host's): then its clock follows the host's, stamped on every event, and its random
    /// generator takes the host's entropy (SnapStart).
    pub in_microvm: bool,
    life: Mutex<Lifecycle>,
}

fn millis(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// Milliseconds to three decimals, as Lambda's telemetry gives them.
fn round(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

impl Agent {
    /// `started_ns`: when this process started, on [`monotonic_ns`].
    pub fn new(
        upstream: Upstream,
        function: FunctionEnvironment,
        in_microvm: bool,
        started_ns: u64,
    ) -> Self {
        let telemetry = Arc::new(Telemetry::default());
        Agent {
            logs: LogSink::start(upstream.clone(), telemetry.clone()),
            extensions: Extensions::new(&function),
            telemetry,
            function,
            reset: Notify::new(),
            upstream,
            in_microvm,
            life: Mutex::new(Lifecycle {
                agent_started_ns: Some(started_ns),
                ..Lifecycle::default()
            }),
        }
    }

    fn life(&self) -> std::sync::MutexGuard<'_, Lifecycle> {
        self.life.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A runtime process was just started (`started` is taken before the spawn).
    pub fn runtime_started(&self, started: Instant, memory: Arc<MemoryProbe>) {
        let since = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.life().runtime = Some(Running {
            started,
            started_ns: monotonic_ns().saturating_sub(since),
            oom_kills_at_start: memory::oom_kills(),
            memory,
            init_ms: None,
            reached_next: false,
        });
        self.telemetry.platform("platform.initStart", || {
            json!({
                "initializationType": self.function.initialization_type,
                "phase": "init",
                "functionName": self.function.function_name,
                "functionVersion": self.function.function_version,
            })
        });
    }

    /// The runtime asked for its next event. It gets it once every extension has asked
    /// for its next too (Lambda's end of init, and of each invocation): an extension
    /// still busy at the invocation's deadline resets the environment, and this waits
    /// for good. The first ask ends init.
    pub async fn next_requested(&self) {
        let deadline = self.life().answered.as_ref().and_then(|a| a.deadline);
        if self.extensions.any() {
            if let Err(busy) = self.extensions.settled(deadline).await {
                let id = self.life().answered.as_ref().map(|a| a.id.clone());
                self.timed_out(id.as_deref().unwrap_or(""), &busy);
                std::future::pending::<()>().await;
            }
        }
        let (init_ms, answered) = {
            let mut life = self.life();
            let init_ms = life
                .runtime
                .as_mut()
                .filter(|rt| !rt.reached_next)
                .map(|rt| {
                    rt.reached_next = true;
                    let ms = millis(rt.started);
                    rt.init_ms = Some(ms);
                    ms
                });
            (init_ms, life.answered.take())
        };
        if let Some(ms) = init_ms {
            let init = |extra: Value| {
                let mut record = json!({
                    "initializationType": self.function.initialization_type,
                    "phase": "init",
                    "status": "success",
                });
                if let (Some(r), Some(e)) = (record.as_object_mut(), extra.as_object()) {
                    r.extend(e.clone());
                }
                record
            };
            self.telemetry
                .platform("platform.initRuntimeDone", || init(json!({})));
            self.telemetry.platform("platform.initReport", || {
                init(json!({"metrics": {"durationMs": round(ms)}}))
            });
        }
        if let Some(a) = answered {
            self.platform_report(&a);
        }
    }

    /// `platform.report`: its duration covers the extensions' time after the runtime's
    /// answer (the `REPORT` line's is the runtime's alone; the host has printed it).
    fn platform_report(&self, a: &Answered) {
        self.telemetry.platform("platform.report", || {
            let duration = millis(a.handed_over);
            let mut metrics = json!({
                "durationMs": round(duration),
                "billedDurationMs": duration.ceil(),
                "memorySizeMB": self.function.memory_mb,
                "maxMemoryUsedMB": a.report.as_ref().map_or(0, |r| r.max_memory_used_mb),
            });
            if let Some(init) = a.report.as_ref().and_then(|r| r.init_duration_ms) {
                metrics["initDurationMs"] = round(init).into();
            }
            json!({"requestId": a.id, "status": a.status, "metrics": metrics})
        });
    }

    /// Extensions did not finish invocation `id` by its deadline: the environment is
    /// reset, as Lambda's timeout resets it.
    fn timed_out(&self, id: &str, busy: &[String]) {
        let reason = format!(
            "extension(s) {} still busy at the deadline of {id}",
            busy.join(", ")
        );
        self.logs.note(&format!(
            "{} {id} Task timed out: {reason}",
            crate::telemetry::timestamp(SystemTime::now())
        ));
        self.request_reset(reason);
    }

    /// Asks the supervisor to reset the environment (stop everything; the host starts a
    /// fresh one).
    pub fn request_reset(&self, reason: String) {
        say!("resetting the environment: {reason}");
        self.life().reset.get_or_insert(reason);
        self.reset.notify_one();
    }

    /// Resolves with the reason once a reset was asked for.
    pub async fn reset_requested(&self) -> String {
        loop {
            let asked = self.reset.notified();
            if let Some(reason) = self.life().reset.clone() {
                return reason;
            }
            asked.await;
        }
    }

    /// An extension registered: Lambda logs it, and tells telemetry.
    pub fn registered(&self, name: &str, events: &[String]) {
        self.logs.note(&format!(
            "EXTENSION\tName: {name}\tState: Ready\tEvents: [{}]",
            events.join(", ")
        ));
        self.telemetry.platform(
            "platform.extension",
            || json!({"name": name, "state": "Ready", "events": events}),
        );
    }

    /// An extension reported an error (`/init/error`, `/exit/error`): during init it
    /// fails the init, later it resets the environment.
    pub async fn extension_failed(&self, error_type: &str, message: &str) {
        self.logs.note(message);
        let in_init = self
            .life()
            .runtime
            .as_ref()
            .is_none_or(|rt| !rt.reached_next);
        if in_init {
            self.report_init_error(error_type, message).await;
        } else {
            self.request_reset(message.to_owned());
        }
    }

    /// The event of invocation `id` is being handed to the runtime (`headers` are the
    /// event's): the extensions get their `INVOKE`.
    pub fn event_handed_over(&self, id: &str, headers: &HeaderMap) {
        self.logs.begin_invocation(id);
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let deadline_ms = text(HEADER_DEADLINE_MS).and_then(|v| v.parse::<u64>().ok());
        let deadline = deadline_ms.map(|ms| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis();
            let left = u128::from(ms).saturating_sub(now);
            Instant::now() + Duration::from_millis(u64::try_from(left).unwrap_or(u64::MAX))
        });
        let trace = text(HEADER_TRACE_ID);
        if self.extensions.any() {
            let arn = text(HEADER_FUNCTION_ARN).unwrap_or_default();
            self.extensions
                .invoke(id, deadline_ms.unwrap_or_default(), arn, trace);
        }
        self.telemetry.platform("platform.start", || {
            let mut record = json!({"requestId": id, "version": self.function.function_version});
            if let Some(trace) = trace {
                record["tracing"] = json!({"type": "X-Amzn-Trace-Id", "value": trace});
            }
            record
        });
        self.life().in_flight = Some(InFlight {
            id: id.to_owned(),
            handed_over: Instant::now(),
            deadline,
            event_in_ns: monotonic_ns(),
        });
    }

    /// In a microVM, tells the host the runtime's peak memory every
    /// [`MEMORY_REPORT_EVERY`] while invocation `id` runs: should the host end it (a
    /// timeout), its `REPORT` has that figure, the guest being past asking by then. A
    /// sandbox's host reads the environment's cgroup itself.
    pub fn report_memory_while_running(self: &Arc<Self>, id: &str) {
        if !self.in_microvm {
            return;
        }
        let agent = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(MEMORY_REPORT_EVERY).await;
                let memory = {
                    let life = agent.life();
                    if life.in_flight.as_ref().map(|f| f.id.as_str()) != Some(id.as_str()) {
                        return;
                    }
                    match &life.runtime {
                        Some(rt) => rt.memory.clone(),
                        None => return,
                    }
                };
                let seen = MemoryUse {
                    request_id: id.clone(),
                    max_memory_used_mb: memory.peak_mb(),
                };
                if let Err(e) = agent.upstream.post_json(PATH_MEMORY, &seen).await {
                    say!("memory report lost: {e}");
                    return;
                }
            }
        });
    }

    /// The runtime posted the result of invocation `id` (`failed`: an error) at
    /// [`monotonic_ns`] `at`. If it is the one in flight, its log is flushed and its
    /// report returned, for the caller to attach to the result it relays.
    pub async fn result_received(
        &self,
        id: &str,
        failed: bool,
        at: u64,
    ) -> Option<InvocationReport> {
        let (flight, report) = {
            let mut life = self.life();
            if life.in_flight.as_ref().map(|f| f.id.as_str()) != Some(id) {
                return None;
            }
            let flight = life.in_flight.take().expect("checked above");
            let duration_ms = millis(flight.handed_over);
            let Lifecycle {
                runtime,
                agent_started_ns,
                ..
            } = &mut *life;
            let report = runtime.as_mut().map(|rt| {
                let init_duration_ms = rt.init_ms.take();
                // The agent's start only before its first runtime's first invocation.
                let agent_started_ns = init_duration_ms.and_then(|_| agent_started_ns.take());
                (
                    rt.memory.clone(),
                    InvocationReport {
                        duration_ms,
                        init_duration_ms,
                        max_memory_used_mb: 0,
                        event_in_ns: Some(flight.event_in_ns),
                        result_in_ns: Some(at),
                        agent_started_ns,
                        runtime_started_ns: agent_started_ns.map(|_| rt.started_ns),
                    },
                )
            });
            (flight, report)
        };
        self.logs.finish_invocation().await;
        let report = report.map(|(memory, mut report)| {
            report.max_memory_used_mb = memory.peak_mb();
            report
        });
        let status = if failed { "error" } else { "success" };
        self.telemetry.platform("platform.runtimeDone", || {
            let duration = report.as_ref().map_or(0.0, |r| r.duration_ms);
            json!({"requestId": id, "status": status, "metrics": {"durationMs": round(duration)}})
        });
        self.life().answered = Some(Answered {
            id: flight.id,
            handed_over: flight.handed_over,
            deadline: flight.deadline,
            status,
            report: report.clone(),
        });
        report
    }

    /// The runtime process ended. Returns whether it had reached its first `/next`.
    pub async fn runtime_exited(&self, exit_code: Option<i32>, signal: Option<i32>) -> bool {
        let (request_id, runtime) = {
            let mut life = self.life();
            (life.in_flight.take().map(|f| f.id), life.runtime.take())
        };
        let reached_next = runtime.as_ref().is_some_and(|rt| rt.reached_next);
        // Read before the runtime's cgroup goes (the caller removes it after this).
        let max_memory_used_mb = runtime.as_ref().map(|rt| rt.memory.peak_mb());
        // Killed (SIGKILL) while the kernel's OOM killer struck: out of memory.
        let oom_killed = runtime.is_some_and(|rt| match rt.memory.oom_killed() {
            Some(killed) => killed,
            None => matches!((rt.oom_kills_at_start, memory::oom_kills()),
                (Some(before), Some(now)) if now > before),
        });
        let out_of_memory = signal == Some(nix::sys::signal::Signal::SIGKILL as i32) && oom_killed;
        self.logs.finish_invocation().await;
        let exit = RuntimeExit {
            request_id,
            exit_code,
            signal,
            out_of_memory,
            max_memory_used_mb,
        };
        say!("runtime exited: {}", exit.to_error().error_message);
        if let Err(e) = self.upstream.post_json(PATH_RUNTIME_EXIT, &exit).await {
            say!("runtime exit report lost: {e}");
        }
        reached_next
    }

    /// Tells the host that no runtime could be started at all.
    pub async fn report_init_error(&self, error_type: &str, message: &str) {
        let body = ErrorBody::new(error_type, message);
        if let Err(e) = self.upstream.post_json(PATH_INIT_ERROR, &body).await {
            say!("init error report lost: {e}");
        }
    }
}
