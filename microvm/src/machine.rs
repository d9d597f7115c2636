//! What a hypervisor backend is asked to boot, and the processes it runs for one VM.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

/// One microVM, described the same way for every backend.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    /// Drives in guest order: the first is `/dev/vda`.
    pub drives: Vec<Drive>,
    pub memory_mib: u32,
    pub vcpus: u8,
    pub guest_cid: u32,
    /// Firecracker's `uds_path`: guest connections to port P reach `<vsock_uds>_P`.
    pub vsock_uds: PathBuf,
    pub console_log: PathBuf,
    /// A folder the backend may use for its own sockets and config files.
    pub work_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Drive {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// Prepares a command for a VM helper process: no stdin, its output to `log`, and killed
/// by the kernel if the host process dies, so that no VM outlives `kindling`.
pub fn vm_command(program: impl AsRef<std::ffi::OsStr>, log: &Path) -> anyhow::Result<Command> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Spawns `cmd`, naming `what` in the error.
pub fn spawn(cmd: &mut Command, what: &str) -> anyhow::Result<Child> {
    cmd.spawn().with_context(|| format!("cannot start {what}"))
}

/// Waits until `path` exists (a helper's socket), failing early if `child` dies first.
pub async fn wait_for_path(
    path: &Path,
    child: &mut Child,
    what: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    while !path.exists() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{what} exited ({status}) before creating {}",
                path.display()
            );
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what} did not create {} within {limit:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Sends SIGKILL and reaps.
pub async fn kill(child: &mut Child) -> io::Result<Option<ExitStatus>> {
    if child.try_wait()?.is_none() {
        child.start_kill()?;
    }
    child.wait().await.map(Some)
}
