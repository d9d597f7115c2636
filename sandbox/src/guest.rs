//! What the sandbox's future PID 1 does between `fork` and `exec`: build the guest's
//! root from the [`Plan`], `pivot_root` into it, lock it, and exec `init`. Runs only in the
//! single-threaded `kindling-sandbox-exec` helper.
//!
//! The whole tree (binds, read-only remounts, `/proc` with its masked and read-only paths,
//! `/sys`, the cgroup2 mount, `/dev`, `/run`, `/tmp`) is built by host root in a mount
//! namespace of the host's user namespace, with host file access only through descriptors
//! opened beforehand ([`Sources`]): the builder's file-system ids are already the sandbox's
//! root's. Only then does the process join the sandbox's user namespace and unshare a
//! mount namespace of its own. The kernel copies the tree into it locked (mount_namespaces(7)):
//! no flag of any mount (read-only, nosuid, nodev, noexec) can be changed from inside and no
//! mount can be unmounted to reveal what it covers, whatever capabilities the sandbox's root
//! holds in its namespace. Its cgroup namespace (and so the cgroup2 mount made here)
//! belongs to the host's user namespace too, so no cgroup hierarchy, v1 or v2, can be
//! mounted in it from inside.
//!
//! Every mount is made inside a namespace whose propagation is private, so nothing here
//! is ever visible on the host, and it all vanishes with the namespace's last process.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kindling_plumbing::dirs;
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::unistd::{
    chdir, dup2_stdin, dup2_stdout, execve, pivot_root, setfsgid, setfsuid, setgroups, sethostname,
    setresgid, setresuid, Gid, Uid,
};

use crate::plan::{
    Entries, Plan, GUEST_HOST_SOCKET, GUEST_INIT, GUEST_INIT_CONFIG, GUEST_RUNTIME_DIR,
    GUEST_TASK_DIR,
};

/// Device nodes the guest gets, each a bind mount of the host's node (creating nodes
/// with `mknod` would not work in a user namespace later, binds always do).
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// The standard links of `/dev` that programs expect.
const DEV_LINKS: &[(&str, &str)] = &[
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// The `PATH` init starts with; the runtime's own comes from bootstrap.
const INIT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A host file or folder the guest root shows.
#[derive(Debug)]
pub enum Source {
    /// Recreated as the same symlink (a merged-`/usr` host's `/bin -> usr/bin`).
    Link(PathBuf),
    /// Bind-mounted from an `O_PATH` descriptor.
    Bind { fd: OwnedFd, dir: bool },
}

impl Source {
    /// Opens `path` as the host root still may: a symlink is read, anything else opened
    /// `O_PATH` (no access to its contents, only a handle to bind).
    fn open(path: &Path) -> Result<Self> {
        let meta =
            fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if meta.file_type().is_symlink() {
            return Ok(Self::Link(fs::read_link(path)?));
        }
        let fd = nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self::Bind {
            fd,
            dir: meta.is_dir(),
        })
    }

    /// The magic link through which the descriptor is bound: following it needs no search
    /// permission on the folders above the file.
    fn bind_path(fd: &OwnedFd) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
    }
}

/// Every host file the guest root shows, opened in the mount namespace the tree is built
/// in while the builder still has the host root's file access (before its file-system ids
/// become the sandbox's root's), so that the bind mounts made later need no path on the host.
#[derive(Debug)]
struct Sources {
    root: Vec<(String, Source)>,
    runtime: Vec<(String, Source)>,
    task: Source,
    host_socket: Source,
    init: Source,
    init_config: Source,
}

impl Sources {
    fn open(plan: &Plan) -> Result<Self> {
        let entries = |entries: &Entries| -> Result<Vec<(String, Source)>> {
            entries
                .iter()
                .map(|(name, path)| Ok((name.clone(), Source::open(path)?)))
                .collect()
        };
        Ok(Self {
            root: entries(&plan.root)?,
            runtime: entries(&plan.runtime)?,
            task: Source::open(&plan.task)?,
            host_socket: Source::open(&plan.host_socket)?,
            init: Source::open(&plan.init)?,
            init_config: Source::open(&plan.init_config)?,
        })
    }
}

/// The namespaces of the sandbox that its user namespace owns (made by the keeper), joined
/// by init's process, which is already in the sandbox's PID namespace.
#[derive(Debug)]
pub struct Namespaces {
    pub user: OwnedFd,
    pub net: OwnedFd,
    pub uts: OwnedFd,
    pub ipc: OwnedFd,
}

/// Builds and locks the guest root, becomes the sandbox's root and execs init. Called by
/// host root, as PID 1 of the sandbox's PID namespace; returns only on failure.
pub fn enter(plan: &Plan, namespaces: &Namespaces) -> Result<Infallible> {
    // A mount namespace and a cgroup namespace of the host's user namespace: what is built
    // here can be copied into the sandbox's only locked, and the cgroup namespace's owner
    // is one the sandbox's root has no capability in.
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWCGROUP)
        .context("unshare(CLONE_NEWNS | CLONE_NEWCGROUP)")?;
    // Nothing below may propagate back to the host's mount namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the mount namespace private")?;
    // Opened in this mount namespace (bind sources must belong to it).
    let sources = Sources::open(plan)?;
    // /sys shows the network namespace of its mounter.
    for (ns, kind, name) in [
        (&namespaces.net, CloneFlags::CLONE_NEWNET, "network"),
        (&namespaces.uts, CloneFlags::CLONE_NEWUTS, "UTS"),
        (&namespaces.ipc, CloneFlags::CLONE_NEWIPC, "IPC"),
    ] {
        setns(ns, kind).with_context(|| format!("joining the sandbox's {name} namespace"))?;
    }
    // From here on files are made, and checked, as the sandbox's root: the tree's folders
    // and tmpfs roots are its own, and no host file is reached by host root's rights
    // (setting the file-system ids drops the file capabilities, not CAP_SYS_ADMIN).
    let root_id = plan.id_map.root();
    setfsgid(Gid::from_raw(root_id));
    setfsuid(Uid::from_raw(root_id));
    sethostname(&plan.hostname).context("setting the hostname")?;
    build_root(plan, &sources)?;
    drop(sources);
    enter_root(&plan.staging)?;
    setns(&namespaces.user, CloneFlags::CLONE_NEWUSER)
        .context("joining the sandbox's user namespace")?;
    // The copy that locks every mount: this namespace belongs to the sandbox's user
    // namespace, the one it copies to the host's.
    unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS) in the user namespace")?;
    become_root()?;
    // Changing ids cleared the parent-death signal: init dies with its keeper.
    set_pdeathsig(Signal::SIGKILL).context("prctl(PR_SET_PDEATHSIG)")?;
    exec_init()
}

/// Becomes id 0 of the user namespace (the host's first id of the sandbox's range), with
/// no supplementary group of the host's, keeping the namespace's capabilities.
fn become_root() -> Result<()> {
    setgroups(&[]).context("setgroups")?;
    let root_gid = Gid::from_raw(0);
    setresgid(root_gid, root_gid, root_gid).context("setresgid 0")?;
    let root_uid = Uid::from_raw(0);
    setresuid(root_uid, root_uid, root_uid).context("setresuid 0")?;
    Ok(())
}

/// Assembles the whole guest file system on the staging directory.
fn build_root(plan: &Plan, sources: &Sources) -> Result<()> {
    let root = &plan.staging;
    mount_tmpfs(root, "mode=755,size=1m", MsFlags::empty())?;
    populate(root, &sources.root)?;
    for dir in [
        "var/runtime",
        "var/task",
        "tmp",
        "dev",
        "proc",
        "sys",
        "run",
    ] {
        dirs::create_all(&root.join(dir), 0o755)?;
    }

    let runtime = root.join(&GUEST_RUNTIME_DIR[1..]);
    mount_tmpfs(&runtime, "mode=755,size=64k", MsFlags::MS_NOSUID)?;
    populate(&runtime, &sources.runtime)?;
    remount_read_only(&runtime, MsFlags::MS_NOSUID)?;

    bind_source_read_only(&sources.task, &root.join(&GUEST_TASK_DIR[1..]))?;

    let tmp_options = format!("mode=1777,size={}m", plan.tmp_size_mb);
    mount_tmpfs(
        &root.join("tmp"),
        &tmp_options,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;

    build_dev(&root.join("dev"))?;
    build_run(sources, &root.join("run"))?;

    mount(
        Some("proc"),
        &root.join("proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .context("mounting /proc")?;
    mount(
        Some("sysfs"),
        &root.join("sys"),
        Some("sysfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .context("mounting /sys")?;
    // The sandbox's own cgroup (its namespace's root), where init makes its workload's:
    // mounted here because nothing inside may mount a cgroup hierarchy.
    mount(
        Some("cgroup2"),
        &root.join("sys/fs/cgroup"),
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .context("mounting /sys/fs/cgroup")?;
    hide_kernel_views(root)
}

/// runc's masked paths: host kernel state a function has no business reading (the host's
/// whole task list in `sched_debug`, timers, keys, firmware tables). A file is covered by
/// `/dev/null`, a folder by an empty read-only tmpfs.
const MASKED_PATHS: [&str; 11] = [
    "proc/acpi",
    "proc/asound",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
];

/// runc's read-only paths: the kernel's tunables and triggers, readable, never writable
/// (whatever credentials a process inside gains).
const READ_ONLY_PATHS: [&str; 5] = [
    "proc/bus",
    "proc/fs",
    "proc/irq",
    "proc/sys",
    "proc/sysrq-trigger",
];

/// Masks [`MASKED_PATHS`] and seals [`READ_ONLY_PATHS`] under the guest's `/proc` and
/// `/sys` (those this kernel has).
fn hide_kernel_views(root: &Path) -> Result<()> {
    for path in MASKED_PATHS {
        let target = root.join(path);
        match fs::symlink_metadata(&target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("masking {}", target.display())),
            Ok(meta) if meta.is_dir() => mount_tmpfs(
                &target,
                "size=0,mode=555",
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            )?,
            Ok(_) => bind_read_only(Path::new("/dev/null"), &target)?,
        }
    }
    for path in READ_ONLY_PATHS {
        let target = root.join(path);
        if target.exists() {
            bind_read_only(&target, &target)?;
        }
    }
    Ok(())
}

/// A minimal `/dev`: a small tmpfs with binds of a few host nodes, never the host's devtmpfs.
fn build_dev(dev: &Path) -> Result<()> {
    mount_tmpfs(
        dev,
        "mode=755,size=64k",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
    )?;
    for name in DEVICES {
        let target = dev.join(name);
        File::create(&target).with_context(|| format!("creating {}", target.display()))?;
        bind(&Path::new("/dev").join(name), &target, MsFlags::empty())?;
    }
    for (name, target) in DEV_LINKS {
        symlink(target, dev.join(name)).with_context(|| format!("linking /dev/{name}"))?;
    }
    // Mount points for init's devpts and shm.
    dirs::create_all(&dev.join("pts"), 0o755)?;
    dirs::create_all(&dev.join("shm"), 0o755)?;
    remount_read_only(dev, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC)
}

/// `/run`: a tmpfs holding the host socket, init and init's configuration.
fn build_run(sources: &Sources, run: &Path) -> Result<()> {
    mount_tmpfs(
        run,
        "mode=755,size=1m",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;
    let in_run = |guest: &str| run.join(guest.strip_prefix("/run/").expect("under /run"));
    let socket = in_run(GUEST_HOST_SOCKET);
    dirs::create_all(socket.parent().expect("a file under /run"), 0o755)?;
    File::create(&socket).with_context(|| format!("creating {}", socket.display()))?;
    // A socket's bind mount stays writable: connecting needs write access to it.
    let Source::Bind { fd, .. } = &sources.host_socket else {
        bail!("the Runtime API socket is a symlink");
    };
    bind(&Source::bind_path(fd), &socket, MsFlags::empty())?;

    for (source, guest) in [
        (&sources.init, GUEST_INIT),
        (&sources.init_config, GUEST_INIT_CONFIG),
    ] {
        let target = in_run(guest);
        File::create(&target).with_context(|| format!("creating {}", target.display()))?;
        bind_source_read_only(source, &target)?;
    }
    Ok(())
}

/// Makes `dir` hold read-only views of `entries`.
fn populate(dir: &Path, entries: &[(String, Source)]) -> Result<()> {
    for (name, source) in entries {
        let target = dir.join(name);
        match source {
            Source::Link(link) => {
                symlink(link, &target).with_context(|| format!("linking {}", target.display()))?;
                continue;
            }
            Source::Bind { dir: true, .. } => dirs::create_all(&target, 0o755)?,
            Source::Bind { dir: false, .. } => {
                File::create(&target).with_context(|| format!("creating {}", target.display()))?;
            }
        }
        bind_source_read_only(source, &target)?;
    }
    Ok(())
}

/// Binds an opened source read-only on `target`, which must exist.
fn bind_source_read_only(source: &Source, target: &Path) -> Result<()> {
    match source {
        Source::Bind { fd, .. } => bind_read_only(&Source::bind_path(fd), target),
        Source::Link(link) => bail!(
            "{} would be a symlink to {}: a folder or file was expected",
            target.display(),
            link.display()
        ),
    }
}

/// Switches the process's root to `new_root` and seals it read-only.
fn enter_root(new_root: &Path) -> Result<()> {
    // pivot_root(".", ".") stacks the old root under the new one at "/", from where a
    // lazy unmount removes it; no put_old directory is needed in a read-only root.
    chdir(new_root).with_context(|| format!("entering {}", new_root.display()))?;
    pivot_root(".", ".").context("pivot_root")?;
    umount2(".", MntFlags::MNT_DETACH).context("detaching the host's root")?;
    chdir("/").context("chdir /")?;
    remount_read_only(Path::new("/"), MsFlags::empty())
}

/// Replaces this process with init, stdout joined to stderr (the console) and stdin empty.
fn exec_init() -> Result<Infallible> {
    let null =
        nix::fcntl::open("/dev/null", OFlag::O_RDWR, Mode::empty()).context("opening /dev/null")?;
    dup2_stdin(&null).context("stdin")?;
    dup2_stdout(std::io::stderr()).context("stdout")?;
    let args = [GUEST_INIT, "--config", GUEST_INIT_CONFIG].map(cstring);
    let env = [cstring(INIT_PATH)];
    let err = execve(&args[0], &args, &env).unwrap_err();
    bail!("executing {GUEST_INIT}: {err}")
}

fn cstring(s: &str) -> CString {
    CString::new(s).expect("constant without NUL")
}

fn mount_tmpfs(target: &Path, options: &str, flags: MsFlags) -> Result<()> {
    mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(options))
        .with_context(|| format!("mounting a tmpfs on {}", target.display()))
}

fn bind(source: &Path, target: &Path, flags: MsFlags) -> Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC | flags,
        None::<&str>,
    )
    .with_context(|| format!("binding {} on {}", source.display(), target.display()))
}

/// A bind mount is made writable and only a remount can flip it to read-only.
fn bind_read_only(source: &Path, target: &Path) -> Result<()> {
    bind(source, target, MsFlags::empty())?;
    remount_read_only(target, MsFlags::MS_BIND | MsFlags::MS_NOSUID)
}

fn remount_read_only(target: &Path, flags: MsFlags) -> Result<()> {
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | flags,
        None::<&str>,
    )
    .with_context(|| format!("making {} read-only", target.display()))
}
