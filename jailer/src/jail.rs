//! The chroot and the way into it.
//!
//! [`prepare`] (before the fork, in the host's namespaces) makes the chroot and puts the
//! program in it. [`enter_and_exec`] (in the forked child) does the rest in a mount
//! namespace of its own whose mounts never propagate back: every mount it makes — the
//! bind mounts, the private `/dev` — vanishes with the namespace when the program ends,
//! and the host only ever sees the empty mount points, which [`remove`] deletes.

use std::convert::Infallible;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use kindling_plumbing::cgroup::Joiner;
use kindling_plumbing::{privileges, seccomp};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::stat::{mknod, Mode, SFlag};
use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
use nix::unistd::{chdir, chown, chroot, execve, pivot_root, Gid, Uid};

use crate::Plan;

/// `RAMFS_MAGIC` of `<linux/magic.h>`: an initramfs is a ramfs (or a tmpfs).
const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);

/// The one device of the jail: the VMM's KVM.
const KVM: &str = "/dev/kvm";

/// Makes `<jail_dir>/root` and links the program into it. A jail dir that exists is an
/// error: another VM has this id, or an earlier jailer did not finish.
pub fn prepare(plan: &Plan) -> anyhow::Result<()> {
    if let Some(parent) = plan.jail_dir.parent() {
        kindling_plumbing::dirs::create_all(parent, 0o755)?;
    }
    let mut dirs = fs::DirBuilder::new();
    dirs.mode(0o755);
    dirs.create(&plan.jail_dir).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => anyhow!(
            "the jail {} exists: another VM has the id {:?}, or it was not cleaned up",
            plan.jail_dir.display(),
            plan.id
        ),
        _ => anyhow!(e).context(format!("creating {}", plan.jail_dir.display())),
    })?;
    let made = dirs
        .create(&plan.root)
        .map_err(anyhow::Error::from)
        .and_then(|()| match plan.exec_in_place {
            true => Ok(()),
            false => link_or_copy(&plan.exec_file, &plan.root.join(&plan.exec_name)),
        });
    if made.is_err() {
        remove(plan);
    }
    made.with_context(|| format!("preparing the jail {}", plan.jail_dir.display()))
}

/// A hard link costs nothing; across file systems the program is copied instead, owned
/// by root and not writable by the jail's user either way.
fn link_or_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    match fs::hard_link(from, to) {
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
            fs::copy(from, to)?;
            Ok(())
        }
        linked => linked.with_context(|| format!("linking {} into the jail", from.display())),
    }
}

/// Removes the jail dir: by now only empty mount points and the program's link are in it.
pub fn remove(plan: &Plan) {
    if let Err(e) = fs::remove_dir_all(&plan.jail_dir) {
        if e.kind() != io::ErrorKind::NotFound {
            eprintln!(
                "kindling-jailer: cannot remove {}: {e}",
                plan.jail_dir.display()
            );
        }
    }
}

/// Enters the jail and execs the program; returns only the error that stopped it.
pub fn enter_and_exec(plan: &Plan, cgroups: &[Joiner]) -> anyhow::Error {
    match enter(plan, cgroups) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn enter(plan: &Plan, cgroups: &[Joiner]) -> anyhow::Result<Infallible> {
    match &plan.netns {
        Some(path) => {
            let netns =
                File::open(path).with_context(|| format!("opening --netns {}", path.display()))?;
            setns(netns, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("joining --netns {}", path.display()))?;
        }
        None => unshare(CloneFlags::CLONE_NEWNET).context("entering a new network namespace")?,
    }
    // A mount namespace, and an IPC namespace: no host SysV IPC or POSIX message queue.
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC)
        .context("entering new mount and IPC namespaces")?;
    // Before any mount: none of the jail's mounts may reach the host's namespace (where
    // removing the jail dir would then delete through them).
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the mounts private")?;
    let root = &plan.root;
    // pivot_root wants the new root to be a mount point.
    bind(root, root, MsFlags::empty())?;
    for (path, writable) in &plan.binds {
        let target = inside(root, path);
        make_mount_point(path, &target)?;
        let flags = if *writable {
            MsFlags::empty()
        } else {
            MsFlags::MS_RDONLY
        };
        bind(path, &target, flags)?;
    }
    make_dev(plan)?;
    remount(root, MsFlags::MS_RDONLY)?;
    for cgroup in cgroups {
        cgroup.join().context("joining the VM's cgroup")?;
    }
    enter_root(root)?;
    // Built while allocating is still fine; installed last, once nothing privileged is left.
    let filters = seccomp::denylist_filters().map_err(|e| anyhow!(e))?;
    privileges::drop_to(plan.uid, plan.gid).context("dropping to --uid/--gid")?;
    // Set after the last uid change, which clears it: the program dies with the relay.
    // SAFETY: PR_SET_PDEATHSIG takes only integers.
    Errno::result(unsafe {
        nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL, 0, 0, 0)
    })?;
    let program = match plan.exec_in_place {
        true => CString::new(plan.exec_file.as_os_str().as_bytes())?,
        false => CString::new(format!("/{}", plan.exec_name))?,
    };
    let mut argv = vec![program.clone()];
    for arg in &plan.args {
        argv.push(CString::new(arg.as_bytes())?);
    }
    let env: [CString; 0] = [];
    seccomp::apply(&filters).context("installing the seccomp denylist")?;
    let err = match execve(&program, &argv, &env) {
        Ok(never) => match never {},
        Err(err) => err,
    };
    Err(match err {
        Errno::ENOENT => anyhow!(
            "exec {program:?} in the jail: {err} (a dynamic executable finds no libraries \
             in the chroot: build it static, or bind its libraries)"
        ),
        _ => anyhow!("exec {program:?} in the jail: {err}"),
    })
}

/// `path`'s place inside `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// An empty folder or file, like `source`, at `target`, with root-owned parents.
fn make_mount_point(source: &Path, target: &Path) -> anyhow::Result<()> {
    if let Some(parent) = target.parent() {
        kindling_plumbing::dirs::create_all(parent, 0o755)?;
    }
    let made = if source.is_dir() {
        fs::DirBuilder::new().mode(0o755).create(target)
    } else {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(target)
            .map(drop)
    };
    made.with_context(|| format!("creating the mount point {}", target.display()))
}

/// Bind-mounts `source` on `target` (not recursively: nothing mounted below `source`
/// comes along), then sets `flags` with nosuid and nodev.
fn bind(source: &Path, target: &Path, flags: MsFlags) -> anyhow::Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .with_context(|| format!("bind-mounting {} in the jail", source.display()))?;
    remount(target, flags)
}

/// Changes a bind mount's flags (always nosuid, nodev).
fn remount(target: &Path, flags: MsFlags) -> anyhow::Result<()> {
    let flags =
        flags | MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .with_context(|| format!("remounting {}", target.display()))
}

/// The jail's `/dev`: a small read-only tmpfs with only `kvm` (unless `--no-kvm`), owned
/// by the jail's user.
fn make_dev(plan: &Plan) -> anyhow::Result<()> {
    let dev = plan.root.join("dev");
    fs::DirBuilder::new().mode(0o755).create(&dev)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        flags,
        Some("mode=755,size=16k"),
    )
    .context("mounting the jail's /dev")?;
    if plan.kvm {
        make_kvm(plan)?;
    }
    mount(
        None::<&str>,
        &dev,
        None::<&str>,
        flags | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .context("remounting the jail's /dev read-only")
}

/// The jail's `/dev/kvm`, the host's device node owned by the jail's user.
fn make_kvm(plan: &Plan) -> anyhow::Result<()> {
    let rdev = fs::metadata(KVM)
        .with_context(|| format!("{KVM}: the VMM needs it"))?
        .rdev();
    let kvm = inside(&plan.root, Path::new(KVM));
    mknod(&kvm, SFlag::S_IFCHR, Mode::from_bits_truncate(0o600), rdev)
        .with_context(|| format!("mknod {}", kvm.display()))?;
    chown(
        &kvm,
        Some(Uid::from_raw(plan.uid)),
        Some(Gid::from_raw(plan.gid)),
    )?;
    Ok(())
}

/// Makes `root` the process's `/`, with the host's tree unreachable. pivot_root detaches
/// the old root; where `/` is the initramfs (rootfs cannot be pivoted away from, as in the
/// nested-KVM harness's L1) the jail is moved over `/` and chrooted into instead, as
/// switch_root and runc do there — with no capability left to the program, neither
/// reaches back.
fn enter_root(root: &Path) -> anyhow::Result<()> {
    chdir(root)?;
    match pivot_root(".", ".") {
        Ok(()) => umount2(".", MntFlags::MNT_DETACH).context("detaching the old root")?,
        Err(Errno::EINVAL) if on_initramfs()? => {
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .context("moving the jail over the initramfs")?;
            chroot(".")?;
        }
        Err(e) => bail!("pivot_root into {}: {e}", root.display()),
    }
    chdir("/")?;
    Ok(())
}

fn on_initramfs() -> anyhow::Result<bool> {
    let kind = statfs(OsStr::new("/"))?.filesystem_type();
    Ok(kind == RAMFS_MAGIC || kind == TMPFS_MAGIC)
}
