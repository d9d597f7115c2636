//! Freezing idle environments, as Lambda does between invocations: once an environment
//! is back in its pool, its runtime waits in `/next` and it has been idle a moment
//! ([`crate::scheduler::SchedulerOptions::freeze_after`]), it is frozen off the caller's
//! path; taking it for an invocation (or to stop it) thaws it first, so that no guest
//! code runs while nobody invoked it and frozen time never counts against an invocation.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
    plans: Mutex<Plans>,
}

/// The latest planned freeze, and whether a task waits to carry it out.
#[derive(Default)]
struct Plans {
    latest: Option<Plan>,
    waiting: bool,
}

/// A freeze planned when the environment went back to its pool.
struct Plan {
    due: tokio::time::Instant,
    /// [`Freezing::taken`] when it was planned.
    taken: u64,
    /// Resolves true once the runtime waits for an event.
    parked: Pin<Box<dyn Future<Output = bool> + Send>>,
    metrics: Arc<Metrics>,
}

impl Freezing {
    pub fn new(freezer: Arc<dyn Freezer>, env: &str, function: &str) -> Arc<Self> {
        Arc::new(Self {
            freezer,
            env: env.to_string(),
            function: function.to_string(),
            frozen: tokio::sync::Mutex::new(false),
            taken: AtomicU64::new(0),
            plans: Mutex::new(Plans::default()),
        })
    }

    fn plans(&self) -> std::sync::MutexGuard<'_, Plans> {
        self.plans.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Freezes the environment `after` from now once `parked` resolves true (its
    /// runtime waits for an event), unless it is taken first. Replaces the plan before:
    /// a later one is only made after the environment was taken, which voids it.
    pub fn freeze_later(
        self: &Arc<Self>,
        after: Duration,
        parked: impl Future<Output = bool> + Send + 'static,
        metrics: Arc<Metrics>,
    ) {
        let plan = Plan {
            due: tokio::time::Instant::now() + after,
            taken: self.taken.load(Ordering::SeqCst),
            parked: Box::pin(parked),
            metrics,
        };
        let mut plans = self.plans();
        plans.latest = Some(plan);
        if !plans.waiting {
            plans.waiting = true;
            tokio::spawn(self.clone().carry_out_plans());
        }
    }

    /// Waits for the latest plan's moment and carries it out, until no plan is left.
    async fn carry_out_plans(self: Arc<Self>) {
        loop {
            let due = {
                let mut plans = self.plans();
                match &plans.latest {
                    Some(plan) => plan.due,
                    None => {
                        plans.waiting = false;
                        return;
                    }
                }
            };
            tokio::time::sleep_until(due).await;
            // A plan made while this one slept is the one to wait for.
            let plan = {
                let mut plans = self.plans();
                match plans.latest.take() {
                    Some(plan) if plan.due > tokio::time::Instant::now() => {
                        plans.latest = Some(plan);
                        None
                    }
                    plan => plan,
                }
            };
            if let Some(plan) = plan {
                self.freeze_if_idle(plan).await;
            }
        }
    }

    async fn freeze_if_idle(&self, plan: Plan) {
        if !plan.parked.await {
            return;
        }
        let mut frozen = self.frozen.lock().await;
        // Checked under the lock: a taker bumps `taken` before it waits for the lock.
        if *frozen || self.taken.load(Ordering::SeqCst) != plan.taken {
            return;
        }
        match self.freezer.freeze().await {
            Ok(()) => {
                *frozen = true;
                plan.metrics.freeze(&self.function);
                tracing::debug!(env = %self.env, "environment frozen");
            }
            Err(e) => {
                tracing::warn!(env = %self.env, error = %e, "cannot freeze an idle environment")
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;

    #[derive(Default)]
    struct Counting {
        freezes: AtomicU64,
    }

    #[async_trait]
    impl Freezer for Counting {
        async fn freeze(&self) -> io::Result<()> {
            self.freezes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn thaw(&self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Back-to-back invocations, each planning a freeze: one task waits for the latest
    /// plan, a take voids what was planned before it, and the environment is frozen once,
    /// `after` the last plan.
    #[tokio::test(start_paused = true)]
    async fn only_the_latest_plan_freezes_and_a_take_voids_it() {
        let counting = Arc::new(Counting::default());
        let freezing = Freezing::new(counting.clone(), "env", "fn");
        let metrics = Arc::new(Metrics::default());
        let after = Duration::from_millis(100);
        for _ in 0..50 {
            assert_eq!(freezing.take().await.unwrap(), None);
            freezing.freeze_later(after, async { true }, metrics.clone());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(counting.freezes.load(Ordering::SeqCst), 0);
        assert!(freezing.plans().waiting);
        tokio::time::sleep(after).await;
        assert_eq!(counting.freezes.load(Ordering::SeqCst), 1);
        assert!(
            !freezing.plans().waiting,
            "the task ends with its last plan"
        );
        // Frozen: the next take thaws it; a plan voided by a take never freezes.
        assert!(freezing.take().await.unwrap().is_some());
        freezing.freeze_later(after, async { true }, metrics.clone());
        freezing.take().await.unwrap();
        tokio::time::sleep(after * 2).await;
        assert_eq!(counting.freezes.load(Ordering::SeqCst), 1);
    }
}
