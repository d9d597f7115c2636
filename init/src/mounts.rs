//! The pseudo filesystems every guest expects, mounted only where nothing is mounted
//! yet: the namespace sandbox's launcher pre-mounts a minimal `/dev`, and a kernel that
//! booted straight from a disk may have mounted `devtmpfs` itself.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};

use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kindling_plumbing::{dirs, mount_table};
use nix::errno::Errno;
use nix::mount::{mount, umount, umount2, MntFlags, MsFlags};

use crate::config::MountEntry;
use crate::console::say;

/// How often to look for a device that is not there yet.
const DEVICE_POLL: Duration = Duration::from_millis(10);

/// One filesystem init may mount.
struct Spec {
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: String,
}

/// Mounts init made, in order, so that shutdown can undo them in reverse.
#[derive(Debug, Default)]
pub struct Mounts {
    made: Vec<PathBuf>,
}

/// Mount points moved into the new root by `switch_root`; their submounts move along.
pub const MOVED_ON_SWITCH: [&str; 5] = ["/dev", "/proc", "/sys", "/run", "/tmp"];

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

fn standard_mounts(tmp_size: &str) -> Vec<Spec> {
    let spec = |target, fstype, flags, data: &str| Spec {
        target,
        fstype,
        flags,
        data: data.to_string(),
    };
    vec![
        spec("/proc", "proc", NOSUID_NODEV_NOEXEC, ""),
        spec("/sys", "sysfs", NOSUID_NODEV_NOEXEC, ""),
        spec("/dev", "devtmpfs", MsFlags::MS_NOSUID, "mode=0755"),
        spec(
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        spec("/dev/shm", "tmpfs", NOSUID_NODEV, "mode=1777"),
        spec("/run", "tmpfs", NOSUID_NODEV, "mode=0755"),
        spec(
            "/tmp",
            "tmpfs",
            NOSUID_NODEV,
            &format!("mode=1777,size={tmp_size}"),
        ),
        spec("/sys/fs/cgroup", "cgroup2", NOSUID_NODEV_NOEXEC, ""),
    ]
}

/// Links every program expects in `/dev`, created where missing.
const DEV_LINKS: [(&str, &str); 4] = [
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
];

impl Mounts {
    /// Mounts the standard set and creates the `/dev` links.
    pub fn mount_standard(&mut self, tmp_size: &str) -> Result<()> {
        // The mount table, read once (each read costs ~0.15 ms, a tenth of init's start in
        // the sandbox): what this loop mounts is below nothing else it checks.
        let mounted = mount_points_now()?;
        for spec in standard_mounts(tmp_size) {
            if !mounted.contains(Path::new(spec.target)) {
                self.mount_spec(&spec)?;
            }
        }
        for (link, target) in DEV_LINKS {
            link_if_absent(Path::new(link), Path::new(target))?;
        }
        self.ptmx(&mounted)
    }

    /// Mounts `/proc` alone, which reading the configuration needs.
    pub fn mount_proc(&mut self) -> Result<()> {
        let proc = &standard_mounts("")[0];
        if is_mount_point(Path::new(proc.target))? {
            return Ok(());
        }
        self.mount_spec(proc)
    }

    fn mount_spec(&mut self, spec: &Spec) -> Result<()> {
        let target = Path::new(spec.target);
        dirs::create_all(target, 0o755)?;
        let data = (!spec.data.is_empty()).then_some(spec.data.as_str());
        mount(
            Some(spec.fstype),
            target,
            Some(spec.fstype),
            spec.flags,
            data,
        )
        .with_context(|| format!("mount {} ({}, {})", spec.target, spec.fstype, spec.data))?;
        self.made.push(target.to_path_buf());
        Ok(())
    }

    /// Mounts one `mounts` entry (or the task drive) unless its target is a mount point
    /// already. A missing source is skipped when optional, else awaited up to `wait`.
    pub fn mount_extra(&mut self, entry: &MountEntry, wait: Duration) -> Result<()> {
        let source = Path::new(&entry.source);
        if is_mount_point(&entry.target)? {
            return Ok(());
        }
        // Only a path source (a device) can be missing; `tmpfs` and the like cannot.
        if source.is_absolute() {
            if entry.optional && !source.exists() {
                return Ok(());
            }
            wait_for_device(source, wait)?;
        }
        dirs::create_all(&entry.target, 0o755)?;
        let (flags, data) = mount_options(&entry.options);
        let data = (!data.is_empty()).then_some(data.as_str());
        mount(
            Some(source),
            &entry.target,
            Some(entry.fstype.as_str()),
            flags,
            data,
        )
        .with_context(|| {
            format!(
                "mount {} on {} ({}, {})",
                entry.source,
                entry.target.display(),
                entry.fstype,
                entry.options
            )
        })?;
        self.made.push(entry.target.clone());
        Ok(())
    }

    /// `/dev/ptmx` must reach the new devpts instance: a link where there is nothing, or
    /// a bind mount over an existing node, which leaves a shared devtmpfs untouched.
    fn ptmx(&mut self, mounted: &BTreeSet<PathBuf>) -> Result<()> {
        let ptmx = Path::new("/dev/ptmx");
        match fs::symlink_metadata(ptmx) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                link_if_absent(ptmx, "pts/ptmx".as_ref())
            }
            Err(e) => Err(e).context("stat /dev/ptmx"),
            Ok(m) if m.file_type().is_symlink() || mounted.contains(ptmx) => Ok(()),
            Ok(_) => {
                mount(
                    Some("/dev/pts/ptmx"),
                    ptmx,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .context("bind /dev/pts/ptmx on /dev/ptmx")?;
                self.made.push(ptmx.to_path_buf());
                Ok(())
            }
        }
    }

    /// Unmounts what init mounted, newest first. A filesystem still in use (the console
    /// keeps `/dev` open) is detached instead; other failures are reported and skipped:
    /// at shutdown there is nothing better to do, and `sync` has already run.
    pub fn unmount_all(&mut self) {
        while let Some(target) = self.made.pop() {
            let result = match umount(&target) {
                Err(Errno::EBUSY) => umount2(&target, MntFlags::MNT_DETACH),
                result => result,
            };
            if let Err(e) = result {
                say!("umount {}: {e}", target.display());
            }
        }
    }
}

/// Splits mount(8)-style options into the flags the kernel takes as bits and the rest,
/// which the filesystem parses itself.
pub fn mount_options(options: &str) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options.split(',').filter(|o| !o.is_empty()) {
        let (flag, set) = match option {
            "ro" => (MsFlags::MS_RDONLY, true),
            "rw" => (MsFlags::MS_RDONLY, false),
            "nosuid" => (MsFlags::MS_NOSUID, true),
            "suid" => (MsFlags::MS_NOSUID, false),
            "nodev" => (MsFlags::MS_NODEV, true),
            "dev" => (MsFlags::MS_NODEV, false),
            "noexec" => (MsFlags::MS_NOEXEC, true),
            "exec" => (MsFlags::MS_NOEXEC, false),
            "noatime" => (MsFlags::MS_NOATIME, true),
            "nodiratime" => (MsFlags::MS_NODIRATIME, true),
            "relatime" => (MsFlags::MS_RELATIME, true),
            "sync" => (MsFlags::MS_SYNCHRONOUS, true),
            "dirsync" => (MsFlags::MS_DIRSYNC, true),
            other => {
                data.push(other);
                continue;
            }
        };
        flags.set(flag, set);
    }
    (flags, data.join(","))
}

/// Waits until `device` exists (devtmpfs adds nodes as drivers probe), up to `wait`.
pub fn wait_for_device(device: &Path, wait: Duration) -> Result<()> {
    let deadline = Instant::now() + wait;
    while !device.exists() {
        if Instant::now() >= deadline {
            bail!(
                "device {} did not appear within {} ms",
                device.display(),
                wait.as_millis()
            );
        }
        sleep(DEVICE_POLL);
    }
    Ok(())
}

fn link_if_absent(link: &Path, target: &Path) -> Result<()> {
    match symlink(target, link) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(e).with_context(|| format!("link {} -> {}", link.display(), target.display()))
        }
        _ => Ok(()),
    }
}

/// Whether something is mounted at `path`. Uses the kernel's mount table when `/proc`
/// is there (it also sees bind mounts of the same filesystem) and otherwise compares
/// the device of `path` with that of its parent.
pub fn is_mount_point(path: &Path) -> Result<bool> {
    match fs::read_to_string("/proc/self/mountinfo") {
        Ok(table) => Ok(mount_points(&table).any(|p| p == path)),
        Err(_) => {
            let dev = |p: &Path| match fs::metadata(p) {
                Ok(m) => Ok(Some(m.dev())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("stat {}", p.display())),
            };
            match (dev(path)?, dev(&path.join(".."))?) {
                (Some(here), Some(parent)) => Ok(here != parent),
                _ => Ok(false),
            }
        }
    }
}

/// The mount points `/proc/self/mountinfo` lists now.
fn mount_points_now() -> Result<BTreeSet<PathBuf>> {
    let table = fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    Ok(mount_points(&table).collect())
}

/// The mount points of a `/proc/self/mountinfo` text (field 5, octal escapes undone).
fn mount_points(table: &str) -> impl Iterator<Item = PathBuf> + '_ {
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(mount_table::unescape(field)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_mount_points_are_unescaped() {
        let table = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                     40 22 0:35 / /mnt/my\\040disk rw shared:5 - ext4 /dev/vdb rw\n";
        let points: Vec<_> = mount_points(table).collect();
        assert_eq!(
            points,
            [PathBuf::from("/proc"), PathBuf::from("/mnt/my disk")]
        );
    }

    #[test]
    fn mount_options_split_into_flags_and_data() {
        let (flags, data) = mount_options("ro,noatime,data=ordered,nosuid,errors=remount-ro");
        assert_eq!(
            flags,
            MsFlags::MS_RDONLY | MsFlags::MS_NOATIME | MsFlags::MS_NOSUID
        );
        assert_eq!(data, "data=ordered,errors=remount-ro");
        assert_eq!(mount_options("ro,rw").0, MsFlags::empty());
        assert_eq!(mount_options(""), (MsFlags::empty(), String::new()));
    }

    #[test]
    fn this_process_sees_its_root_and_proc_mounted() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        assert!(is_mount_point(Path::new("/proc")).unwrap());
        assert!(!is_mount_point(Path::new("/proc/self")).unwrap());
    }
}
