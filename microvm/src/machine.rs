//! What a hypervisor backend is asked to boot, and the processes it runs for one VM: as
//! a user of their own ([`VmUser`]), never as root.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use kindling_plumbing::ids::{IdLease, IdPool};
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
    /// A folder the backend may use for its config files and logs (root's: the
    /// hypervisor cannot write there).
    pub work_dir: PathBuf,
    /// The folder of the VM's sockets, `vsock_uds` among them, owned by `user`: the only
    /// place the hypervisor's processes can write, and where the host reaches them.
    pub socket_dir: PathBuf,
    /// Whom the hypervisor's processes run as.
    pub user: VmUser,
    /// SnapStart: the folder (`user`'s) the VM writes its snapshot into when asked
    /// ([`crate::RunningVm::snapshot`]); `None` when it is not to take one.
    pub snapshot_dir: Option<PathBuf>,
    /// The host's tap for the guest's virtio-net (`eth0`), configured by the host; `None`:
    /// the guest has no network device.
    pub tap: Option<Arc<OwnedFd>>,
}

#[derive(Debug, Clone)]
pub struct Drive {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// The host uid (and gid, the same number) of one VM's hypervisor processes. Each running
/// VM gets its own from [`VM_IDS`], so that no VM's processes can signal, trace or write
/// another's; none owns a file on the host but its VM's socket folder. Nothing in the range
/// needs a passwd entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmUser {
    pub uid: u32,
    pub gid: u32,
}

/// The ids VMs run as: far above the ids of a distribution's users (below 65536) and of
/// the first subordinate-id ranges (`/etc/subuid` starts at 100000, 65536 wide).
pub const VM_IDS: std::ops::Range<u32> = 900_000..904_096;

/// The ids that running VMs of this process hold.
static TAKEN: IdPool = IdPool::new(VM_IDS);

/// One [`VmUser`], held while its VM runs.
#[derive(Debug)]
pub struct VmUserLease(IdLease);

impl VmUserLease {
    /// The lowest free id of [`VM_IDS`].
    pub fn take() -> anyhow::Result<Self> {
        Ok(VmUserLease(
            TAKEN.take().map_err(|e| anyhow::anyhow!("VM users: {e}"))?,
        ))
    }

    pub fn user(&self) -> VmUser {
        let id = self.0.id();
        VmUser { uid: id, gid: id }
    }
}

/// `path` opened for appending (a helper's log), for a child's stdout or stderr.
pub fn log_file(path: &Path) -> anyhow::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    Ok(file.into())
}

/// Prepares a command for a VM helper process: no stdin, `stdout` and `stderr` as given,
/// killed by the kernel if the host process dies (so that no VM outlives `kindling`) and,
/// with `user`, run as that user with every capability set empty and `no_new_privs`, in
/// network and IPC namespaces of its own: a hypervisor needs no network (its sockets are
/// Unix sockets by path), and one that a guest takes over reaches no host service on
/// loopback and no host SysV IPC.
pub fn vm_command(
    program: impl AsRef<OsStr>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    user: Option<VmUser>,
) -> anyhow::Result<Command> {
    let program = program.as_ref();
    // An unprivileged user may not reach the program's folder (`cargo install` puts
    // vhost-device-vsock under root's home): the host opens it, and the child execs it as
    // `/proc/self/fd/N`, named `program` in its argv[0]. The closure below owns the file,
    // so it stays open until the command is dropped, after the spawn.
    let opened = match user {
        Some(_) => Some(open_program(program)?),
        None => None,
    };
    let mut cmd = match &opened {
        Some(file) => {
            let mut cmd = Command::new(format!("/proc/self/fd/{}", file.as_raw_fd()));
            cmd.arg0(program);
            cmd
        }
        None => Command::new(program),
    };
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true);
    // SAFETY: unshare(2) takes only flags; drop_to makes only async-signal-safe system
    // calls and allocates nothing; prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches
    // only the child. Namespaces come while the child is still root, the death signal
    // last: a uid change clears it.
    unsafe {
        cmd.pre_exec(move || {
            let _open_until_exec = &opened;
            if let Some(user) = user {
                if libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWIPC) != 0 {
                    return Err(io::Error::last_os_error());
                }
                kindling_plumbing::privileges::drop_to(user.uid, user.gid)?;
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// `program` (a path, or a name looked up on `$PATH`), opened for exec.
fn open_program(program: &OsStr) -> anyhow::Result<File> {
    let path = if Path::new(program).components().count() > 1 {
        Some(PathBuf::from(program))
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(program))
                .find(|path| path.is_file())
        })
    };
    let path = path.with_context(|| format!("{} is not on $PATH", program.to_string_lossy()))?;
    File::open(&path).with_context(|| format!("cannot open {}", path.display()))
}

/// Files the host opens for an unprivileged hypervisor, which reopens each as
/// `/proc/self/fd/N`: that needs no search permission on the folders above it (the image
/// cache lies under root's home), only read permission on the file.
#[derive(Debug, Default)]
pub struct PassedFiles(Vec<File>);

impl PassedFiles {
    /// Opens `path` read-only, or read-write; returns the path the child opens it by.
    pub fn pass(&mut self, path: &Path, writable: bool) -> anyhow::Result<String> {
        let file = File::options()
            .read(true)
            .write(writable)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let name = format!("/proc/self/fd/{}", file.as_raw_fd());
        self.0.push(file);
        Ok(name)
    }

    /// Passes an open descriptor as it is (a tap); returns its number in the child.
    pub fn pass_fd(&mut self, fd: &OwnedFd) -> anyhow::Result<i32> {
        let file = File::from(fd.try_clone().context("duplicating a descriptor")?);
        let number = file.as_raw_fd();
        self.0.push(file);
        Ok(number)
    }

    /// Lets the child of `cmd` keep the files across exec; they stay open here until
    /// `self` is dropped, after the spawn.
    pub fn inherit_into(&self, cmd: &mut Command) {
        let fds: Vec<i32> = self.0.iter().map(AsRawFd::as_raw_fd).collect();
        // SAFETY: fcntl(F_SETFD) is async-signal-safe; the fds are open in the child (it
        // inherits them from this process, where `self` keeps them open) and the closure
        // only reads its own Vec, allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
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
