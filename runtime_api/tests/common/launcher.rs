//! A [`Launcher`] whose environments are host processes: `python3 tests/fake_guest.py
//! <runtime API socket>`, a guest that speaks the Runtime API and Kindling's extension
//! endpoints over the real Unix socket, the way bootstrap does.

use std::io;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use kindling_runtime_api::{Environment, EnvironmentSpec, Launcher, StopMode};
use tokio::process::{Child, Command};

/// Process ids of every environment started, and how many are running now.
#[derive(Default)]
pub struct Census {
    pub started: Mutex<Vec<u32>>,
    pub running: AtomicUsize,
}

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
        Ok(Box::new(ProcessEnv {
            id: spec.id.clone(),
            child,
            census: self.census.clone(),
            counted: true,
        }))
    }
}

struct ProcessEnv {
    id: String,
    child: Child,
    census: Arc<Census>,
    counted: bool,
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

    async fn stop(&mut self, _mode: StopMode) -> io::Result<()> {
        // The fake guest holds nothing worth a graceful shutdown: both modes kill.
        let result = match self.child.try_wait()? {
            Some(_) => Ok(()),
            None => self.child.kill().await,
        };
        self.uncount();
        result
    }
}
