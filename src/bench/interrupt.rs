//! Ctrl-C or SIGTERM during a bench: the server in flight stops its environments the
//! way `kindling serve` does on those signals, so that an interrupted bench leaves no
//! VM, sandbox or state folder behind.

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Whether the bench was asked to stop; cheap to clone into every part that waits.
#[derive(Clone)]
pub struct Interrupt(watch::Receiver<bool>);

impl Interrupt {
    /// Starts listening for SIGINT and SIGTERM (from then on they no longer kill the
    /// process at once: every wait of the bench must also wait on [`Interrupt::wait`]).
    pub fn listen() -> anyhow::Result<Self> {
        let (tx, rx) = watch::channel(false);
        let mut term = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot watch for SIGINT")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tx.send_replace(true);
        });
        Ok(Self(rx))
    }

    /// Resolves once a signal came.
    pub async fn wait(mut self) {
        if self.0.wait_for(|&stop| stop).await.is_err() {
            // The listener is gone without a signal: nothing will interrupt us.
            std::future::pending::<()>().await;
        }
    }
}
