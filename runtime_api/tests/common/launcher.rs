//! A [`Launcher`] whose environments are host processes: `python3 tests/fake_guest.py
//! <runtime API socket>`, a guest that speaks the Runtime API and Kindling's extension
//! endpoints over the real Unix socket, the way bootstrap does. They are frozen with
//! SIGSTOP and thawed with SIGCONT.

use std::io;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use kindling_runtime_api::{Environment, EnvironmentSpec, Freezer, Launcher, StopMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Process ids of every environment started, and how many are running now; how often
/// they were frozen and thawed, and how many were stopped while frozen. `refuse_starts`
/// makes that many next starts fail, as a launcher on a host in trouble would. A graceful
/// stop takes [`GRACEFUL_STOP_TAKES`], as a guest's shutdown does; `most_stopping` is the
/// most stops under way at once.
#[derive(Default)]
pub struct Census {
    pub refuse_starts: AtomicUsize,
    pub started: Mutex<Vec<u32>>,
    pub running: AtomicUsize,
    pub freezes: AtomicUsize,
    pub thaws: AtomicUsize,
    pub stopped_frozen: AtomicUsize,
    pub stopping: AtomicUsize,
    pub most_stopping: AtomicUsize,
}

pub const GRACEFUL_STOP_TAKES: std::time::Duration = std::time::Duration::from_millis(300);

pub struct ProcessLauncher {
    pub census: Arc<Census>,
}

impl ProcessLauncher {
    pub fn new() -> (Self, Arc<Census>) {
        let census = Arc::new(Census::default());
        (
            Self {
                census: census.clone(),
            },
            census,
        )
    }
}

/// Whether python3 is there; tests that need it print why they skip otherwise.
pub fn have_python() -> bool {
    std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[async_trait]
impl Launcher for ProcessLauncher {
    fn name(&self) -> &str {
        "test-process"
    }

    async fn start(&self, spec: &EnvironmentSpec) -> anyhow::Result<Box<dyn Environment>> {
        let refuse =
            self.census
                .refuse_starts
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if refuse.is_ok() {
            anyhow::bail!("refused on purpose: the host is out of something");
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_guest.py");
        let child = Command::new("python3")
            .arg(script)
            .arg(spec.runtime_api_socket())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.census
            .started
            .lock()
            .unwrap()
            .push(child.id().unwrap_or(0));
        self.census.running.fetch_add(1, Ordering::SeqCst);
        let freezer = Arc::new(StopSignals {
            pid: Pid::from_raw(child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0)),
            frozen: AtomicBool::new(false),
            census: self.census.clone(),
        });
        Ok(Box::new(ProcessEnv {
            id: spec.id.clone(),
            child,
            census: self.census.clone(),
            counted: true,
            freezer,
        }))
    }
}

struct ProcessEnv {
    id: String,
    child: Child,
    census: Arc<Census>,
    counted: bool,
    freezer: Arc<StopSignals>,
}

/// Freezes the fake guest with SIGSTOP, thaws it with SIGCONT.
struct StopSignals {
    pid: Pid,
    frozen: AtomicBool,
    census: Arc<Census>,
}

#[async_trait]
impl Freezer for StopSignals {
    async fn freeze(&self) -> io::Result<()> {
        kill(self.pid, Signal::SIGSTOP)?;
        self.frozen.store(true, Ordering::SeqCst);
        self.census.freezes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn thaw(&self) -> io::Result<()> {
        kill(self.pid, Signal::SIGCONT)?;
        self.frozen.store(false, Ordering::SeqCst);
        self.census.thaws.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl ProcessEnv {
    fn uncount(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.census.running.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[async_trait]
impl Environment for ProcessEnv {
    fn id(&self) -> &str {
        &self.id
    }

    fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    async fn exited(&mut self) -> String {
        match self.child.wait().await {
            Ok(status) => match (
                status.code(),
                std::os::unix::process::ExitStatusExt::signal(&status),
            ) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(sig)) => format!("signal {sig}"),
                _ => "unknown exit".into(),
            },
            Err(e) => format!("cannot wait: {e}"),
        }
    }

    fn freezer(&self) -> Option<Arc<dyn Freezer>> {
        Some(self.freezer.clone())
    }

    async fn stop(&mut self, mode: StopMode) -> io::Result<()> {
        if self.freezer.frozen.load(Ordering::SeqCst) {
            self.census.stopped_frozen.fetch_add(1, Ordering::SeqCst);
        }
        if matches!(mode, StopMode::Graceful(_)) {
            let now = self.census.stopping.fetch_add(1, Ordering::SeqCst) + 1;
            self.census.most_stopping.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(GRACEFUL_STOP_TAKES).await;
            self.census.stopping.fetch_sub(1, Ordering::SeqCst);
        }
        // The fake guest holds nothing worth a graceful shutdown: both modes then kill.
        let result = match self.child.try_wait()? {
            Some(_) => Ok(()),
            None => self.child.kill().await,
        };
        self.uncount();
        result
    }
}
