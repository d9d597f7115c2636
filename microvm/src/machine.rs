//! What a hypervisor backend is asked to boot, and the processes it runs for one VM: as
//! a user of their own ([`VmUser`]), never as root.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context};
use kindling_plumbing::cgroup::Hierarchies;
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
    pub tap: Option<GuestTap>,
}

/// A tap the host made and addressed for a guest ([`kindling_network::Lease::tap`]): the
/// hypervisor, jailed in an empty network namespace, is handed it open
/// ([`Jail::keep_fd`]) and only uses it.
#[derive(Debug, Clone)]
pub struct GuestTap {
    pub fd: Arc<OwnedFd>,
    /// Its interface name on the host.
    pub name: String,
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

/// The ids that running VMs hold, in every server on the host.
static TAKEN: IdPool = IdPool::new("vm-users", VM_IDS);

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

/// One hypervisor program to start through `kindling-jailer`.
#[derive(Debug)]
pub struct Jail<'a> {
    pub program: &'a Path,
    pub user: VmUser,
    /// Files and folders bound at their own paths, each with whether the program may
    /// write it; the VM's socket folder is always bound read-write.
    pub files: &'a [(&'a Path, bool)],
    /// Whether the jail's `/dev` holds `kvm`.
    pub kvm: bool,
    /// A descriptor the program inherits at the same number (the guest's tap).
    pub keep_fd: Option<BorrowedFd<'a>>,
    /// What its cgroup allows it.
    pub limits: Limits,
}

/// The cgroup limits of one jailed program: a guest that takes over its VMM, or a VMM
/// bug, can take no more of the host's memory and tasks than this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory (resident and page cache), guest RAM included.
    pub memory_mib: u64,
    /// Threads and processes.
    pub pids: u32,
}

/// The parent of every jailed program's cgroup: `<mount>/kindling-vms/<exec name>/<id>`.
const CGROUP_PARENT: &str = "kindling-vms";

/// How the host's cgroups hold memory and pids limits: the jailer's `--cgroup-version`
/// and the file names of that version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CgroupFiles {
    version: &'static str,
    memory: &'static str,
}

/// This host's [`CgroupFiles`], looked up once; `None` (said once in the log) where no
/// hierarchy offers both memory and pids: VMs then run without limits of their own.
fn cgroup_files() -> Option<CgroupFiles> {
    static FOUND: OnceLock<Option<CgroupFiles>> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let found = match Hierarchies::read() {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!("VMs run without cgroup limits: {e}");
                return None;
            }
        };
        if found.v2_offering(&["memory", "pids"]).is_some() {
            Some(CgroupFiles {
                version: "2",
                memory: "memory.max",
            })
        } else if found.v1("memory").is_some() && found.v1("pids").is_some() {
            Some(CgroupFiles {
                version: "1",
                memory: "memory.limit_in_bytes",
            })
        } else {
            tracing::warn!(
                "VMs run without cgroup limits: no cgroup hierarchy offers memory and pids"
            );
            None
        }
    })
}

/// The cgroup of `program`'s jail, below each cgroup mount.
pub fn cgroup_path(spec: &VmSpec, program: &Path) -> PathBuf {
    Path::new(CGROUP_PARENT)
        .join(exec_name(program))
        .join(jail_id(spec))
}

/// `jailer` starting `jail.program` in a chroot of its own under the environment's
/// folder (removed with it) in new PID, mount, IPC and network namespaces (an empty
/// network namespace: a VM's network device is a tap the host hands over open, see
/// [`Jail::keep_fd`]), as `jail.user` with no capability and
/// `no_new_privs`: a program that a guest takes over is an unprivileged process that
/// sees only the files it was given, reaches no host service on loopback, and no host
/// SysV IPC. The program's arguments follow.
pub fn jailed(
    jailer: &Path,
    spec: &VmSpec,
    jail: &Jail,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> Command {
    let mut cmd = Command::new(jailer);
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true);
    // The jailer dies with this process (so no VM outlives `kindling`): it sets its own
    // parent-death signal, so that, with no `pre_exec` hook, this large process spawns it
    // with posix_spawn instead of a fork. The signal follows the spawning thread, a tokio
    // worker that lives as long as the server.
    cmd.args(["--parent-pid", &std::process::id().to_string()])
        .arg("--id")
        .arg(jail_id(spec))
        .arg("--exec-file")
        .arg(jail.program)
        .args(["--uid", &jail.user.uid.to_string()])
        .args(["--gid", &jail.user.gid.to_string()])
        .arg("--chroot-base-dir")
        .arg(&spec.work_dir)
        .arg("--bind-rw")
        .arg(&spec.socket_dir);
    for (path, writable) in jail.files {
        cmd.arg(if *writable { "--bind-rw" } else { "--bind" })
            .arg(path);
    }
    if !jail.kvm {
        cmd.arg("--no-kvm");
    }
    if let Some(files) = cgroup_files() {
        let cgroup = cgroup_path(spec, jail.program);
        // The VM's id is this server's alone while it runs: a cgroup of that id is a dead
        // server's, and the jailer refuses to start beside it.
        if let Err(e) = Hierarchies::read().and_then(|found| found.remove_leftover(&cgroup)) {
            tracing::warn!(cgroup = %cgroup.display(), "a dead server's VM cgroup: {e}");
        }
        let parent = cgroup.parent().unwrap_or(Path::new(CGROUP_PARENT));
        let limits = jail.limits;
        cmd.args(["--cgroup-version", files.version])
            .arg("--parent-cgroup")
            .arg(parent)
            .arg("--cgroup")
            .arg(format!("{}={}", files.memory, limits.memory_mib << 20))
            .arg("--cgroup")
            .arg(format!("pids.max={}", limits.pids));
    }
    if let Some(fd) = jail.keep_fd {
        let fd = fd.as_raw_fd();
        cmd.args(["--keep-fd", &fd.to_string()]);
        // This hook makes the spawn a fork of this process again (std's posix_spawn has no
        // way to pass a descriptor on at its own number): only VMs with a network pay it.
        // SAFETY: fcntl(F_SETFD) is async-signal-safe; `fd` is open in the child, which
        // inherits it from this process, where the caller's borrow keeps it open until
        // the spawn has returned.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.arg("--");
    cmd
}

/// The jail's id: the VM's user, which no other running VM holds.
fn jail_id(spec: &VmSpec) -> String {
    format!("vm-{}", spec.user.uid)
}

/// Where the jailer makes the chroot of `program` for this VM:
/// `<chroot-base-dir>/<exec file name>/<id>`.
pub fn jail_dir(spec: &VmSpec, program: &Path) -> PathBuf {
    spec.work_dir.join(exec_name(program)).join(jail_id(spec))
}

/// Removes the jail an earlier VM program of this environment left behind: a jailer that
/// is killed (a restore that failed, a VMM that never answered) cannot remove its chroot,
/// and the next jailer of the environment, with the same id, refuses to start beside it.
/// Nothing is mounted there in the host's namespace (the jail's mounts live and die in
/// the jailed process's own), so this removes only empty mount points and a link.
pub fn remove_leftover_jail(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => tracing::info!(jail = %dir.display(), "removed an earlier VM program's jail"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(jail = %dir.display(), error = %e, "cannot remove an earlier VM program's jail")
        }
    }
}

/// The program's file name, which names its jail and its cgroup's parent.
fn exec_name(program: &Path) -> &OsStr {
    program.file_name().unwrap_or(program.as_os_str())
}

/// `program` (a path, or a name looked up on `$PATH`).
pub fn find_program(program: &str) -> anyhow::Result<PathBuf> {
    if Path::new(program).components().count() > 1 {
        return Ok(PathBuf::from(program));
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(program))
                .find(|path| path.is_file())
        })
        .with_context(|| format!("{program} is not on $PATH"))
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
