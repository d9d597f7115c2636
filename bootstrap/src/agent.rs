//! The agent's view of one runtime's life: when it started, whether it reached its first
//! `/next`, which invocation it is working on and since when. The relay calls in here at
//! each step of the Runtime API; the supervisor when the runtime starts and exits.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kindling_wire::{
    monotonic_ns, ErrorBody, InvocationReport, RuntimeExit, PATH_INIT_ERROR, PATH_RUNTIME_EXIT,
};

use crate::logs::LogSink;
use crate::memory::{self, MemoryProbe};
use crate::upstream::Upstream;

struct Running {
    started: Instant,
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
    /// [`monotonic_ns`] at the hand-over, for the per-hop stamps.
    event_in_ns: u64,
}

#[derive(Default)]
struct Lifecycle {
    runtime: Option<Running>,
    in_flight: Option<InFlight>,
}

pub struct Agent {
    pub upstream: Upstream,
    pub logs: Arc<LogSink>,
    /// Whether this agent runs in a microVM, whose kernel is its own (a sandbox shares the
    /// host's): then its clock follows the host's, stamped on every event, and its random
    /// generator takes the host's entropy (SnapStart).
    pub in_microvm: bool,
    life: Mutex<Lifecycle>,
}

fn millis(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

impl Agent {
    pub fn new(upstream: Upstream, in_microvm: bool) -> Self {
        Agent {
            logs: LogSink::start(upstream.clone()),
            upstream,
            in_microvm,
            life: Mutex::new(Lifecycle::default()),
        }
    }

    fn life(&self) -> std::sync::MutexGuard<'_, Lifecycle> {
        self.life.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A runtime process was just started (`started` is taken before the spawn).
    pub fn runtime_started(&self, started: Instant, memory: Arc<MemoryProbe>) {
        self.life().runtime = Some(Running {
            started,
            oom_kills_at_start: memory::oom_kills(),
            memory,
            init_ms: None,
            reached_next: false,
        });
    }

    /// The runtime asked for its next event: its first ask ends its init.
    pub fn next_requested(&self) {
        if let Some(rt) = self.life().runtime.as_mut() {
            if !rt.reached_next {
                rt.reached_next = true;
                rt.init_ms = Some(millis(rt.started));
            }
        }
    }

    /// The event of invocation `id` is being handed to the runtime.
    pub fn event_handed_over(&self, id: &str) {
        self.logs.begin_invocation(id);
        self.life().in_flight = Some(InFlight {
            id: id.to_owned(),
            handed_over: Instant::now(),
            event_in_ns: monotonic_ns(),
        });
    }

    /// The runtime posted the result of invocation `id` ([`monotonic_ns`] `at`). If it is
    /// the one in flight, its log is flushed and its report returned, for the caller to
    /// attach to the result it relays.
    pub async fn result_received(&self, id: &str, at: u64) -> Option<InvocationReport> {
        let report = {
            let mut life = self.life();
            if life.in_flight.as_ref().map(|f| f.id.as_str()) != Some(id) {
                return None;
            }
            let flight = life.in_flight.take().expect("checked above");
            let duration_ms = millis(flight.handed_over);
            life.runtime.as_mut().map(|rt| {
                (
                    rt.memory.clone(),
                    InvocationReport {
                        duration_ms,
                        init_duration_ms: rt.init_ms.take(),
                        max_memory_used_mb: 0,
                        event_in_ns: Some(flight.event_in_ns),
                        result_in_ns: Some(at),
                    },
                )
            })
        };
        self.logs.finish_invocation().await;
        report.map(|(memory, mut report)| {
            report.max_memory_used_mb = memory.peak_mb();
            report
        })
    }

    /// The runtime process ended. Returns whether it had reached its first `/next`.
    pub async fn runtime_exited(&self, exit_code: Option<i32>, signal: Option<i32>) -> bool {
        let (request_id, reached_next, oom_kills_at_start) = {
            let mut life = self.life();
            let runtime = life.runtime.take();
            let reached = runtime.as_ref().is_some_and(|rt| rt.reached_next);
            (
                life.in_flight.take().map(|f| f.id),
                reached,
                runtime.and_then(|rt| rt.oom_kills_at_start),
            )
        };
        // Killed (SIGKILL) while the kernel's OOM killer struck: out of memory.
        let out_of_memory = signal == Some(nix::sys::signal::Signal::SIGKILL as i32)
            && matches!((oom_kills_at_start, memory::oom_kills()), (Some(before), Some(now)) if now > before);
        self.logs.finish_invocation().await;
        let exit = RuntimeExit {
            request_id,
            exit_code,
            signal,
            out_of_memory,
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
