//! Freezing idle environments, as Lambda does between invocations: once an environment
//! is back in its pool, its runtime waits in `/next` and it has been idle a moment
//! ([`crate::scheduler::SchedulerOptions::freeze_after`]), it is frozen off the caller's
//! path; taking it for an invocation (or to stop it) thaws it first, so that no guest
//! code runs while nobody invoked it and frozen time never counts against an invocation.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::environment::Freezer;
use crate::metrics::Metrics;

/// One environment's freezer and whether it is frozen now.
pub(crate) struct Freezing {
    freezer: Arc<dyn Freezer>,
    env: String,
    function: String,
    /// Whether the environment is frozen; held across a freeze or a thaw, so that the two
    /// never overlap and a thaw waits for a freeze under way.
    frozen: tokio::sync::Mutex<bool>,
    /// Bumped whenever the environment is taken: a freeze planned before that is void.
    taken: AtomicU64,
}

impl Freezing {
    pub fn new(freezer: Arc<dyn Freezer>, env: &str, function: &str) -> Arc<Self> {
        Arc::new(Self {
            freezer,
            env: env.to_string(),
            function: function.to_string(),
            frozen: tokio::sync::Mutex::new(false),
            taken: AtomicU64::new(0),
        })
    }

    /// Freezes the environment `after` from now once `parked` resolves true (its
    /// runtime waits for an event), unless it is taken first. Runs on a task of its own.
    pub fn freeze_later(
        self: &Arc<Self>,
        after: Duration,
        parked: impl Future<Output = bool> + Send + 'static,
        metrics: Arc<Metrics>,
    ) {
        let planned = self.taken.load(Ordering::SeqCst);
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if !parked.await {
                return;
            }
            let mut frozen = this.frozen.lock().await;
            // Checked under the lock: a taker bumps `taken` before it waits for the lock.
            if *frozen || this.taken.load(Ordering::SeqCst) != planned {
                return;
            }
            match this.freezer.freeze().await {
                Ok(()) => {
                    *frozen = true;
                    metrics.freeze(&this.function);
                    tracing::debug!(env = %this.env, "environment frozen");
                }
                Err(e) => {
                    tracing::warn!(env = %this.env, error = %e, "cannot freeze an idle environment")
                }
            }
        });
    }

    /// Takes the environment: voids any planned freeze and thaws it if it is frozen.
    /// Returns how long the thaw took (`None`: it was not frozen).
    pub async fn take(&self) -> io::Result<Option<Duration>> {
        self.taken.fetch_add(1, Ordering::SeqCst);
        let mut frozen = self.frozen.lock().await;
        if !*frozen {
            return Ok(None);
        }
        let started = Instant::now();
        self.freezer.thaw().await?;
        *frozen = false;
        Ok(Some(started.elapsed()))
    }
}
