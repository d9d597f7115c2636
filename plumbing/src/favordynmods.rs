//! Cheap cgroup migrations for every environment's start.
//!
//! Moving a process into a cgroup (the sandbox helper into its environment's, init's
//! agent into its workload cgroup, the jailer into a VM program's) takes the kernel's
//! global `cgroup_threadgroup_rwsem` for writing, which by default waits for an RCU grace
//! period every time: 14–18 ms per move on this project's machines, against 0.3 ms
//! without the wait, and a sandbox's cold start makes two. The kernel's `favordynmods`
//! option (Linux 6.0+) takes the wait away, for a little more cost on forks and exits
//! (none since Linux 6.18, which then locks per process instead, and keeps doing so until
//! the host reboots). Any hierarchy with the option turns it on for all, so this makes a
//! named cgroup v1 hierarchy of Kindling's own with it, mounted nowhere: a detached mount
//! of the new mount API, held by a descriptor for as long as this process lives. No mount
//! of the host changes, and a process that dies leaves nothing behind.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use nix::libc;

/// The hierarchy's name, shared by every Kindling process on the host: the kernel hands a
/// second mount of a named hierarchy the one that exists.
const NAME: &CStr = c"kindling-favordynmods";

// fsconfig(2)'s commands (`enum fsconfig_command` of linux/mount.h).
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;

/// The detached mount that keeps the option on, or why there is none.
static HELD: OnceLock<Result<OwnedFd, String>> = OnceLock::new();

/// Turns `favordynmods` on for as long as this process lives; later calls answer what the
/// first did. Needs `CAP_SYS_ADMIN`. `Err` says why not (no cgroup v1 in the kernel, or
/// a kernel without the option): cgroup migrations then stay as slow as they were.
pub fn enable() -> Result<(), &'static str> {
    match HELD.get_or_init(hold) {
        Ok(_) => Ok(()),
        Err(why) => Err(why),
    }
}

fn hold() -> Result<OwnedFd, String> {
    let fail = |step: &str, e: io::Error| format!("{step}: {e}");
    // SAFETY: fsopen(2) reads the NUL-terminated name, which outlives the call, and
    // returns a new descriptor or -1.
    let context =
        owned(unsafe { libc::syscall(libc::SYS_fsopen, c"cgroup".as_ptr(), libc::FSOPEN_CLOEXEC) })
            .map_err(|e| fail("fsopen(cgroup)", e))?;
    fsconfig(&context, FSCONFIG_SET_FLAG, Some(c"none"), None)
        .map_err(|e| fail("fsconfig none", e))?;
    fsconfig(&context, FSCONFIG_SET_STRING, Some(c"name"), Some(NAME))
        .map_err(|e| fail("fsconfig name", e))?;
    fsconfig(&context, FSCONFIG_SET_FLAG, Some(c"favordynmods"), None)
        .map_err(|e| fail("fsconfig favordynmods", e))?;
    fsconfig(&context, FSCONFIG_CMD_CREATE, None, None).map_err(|e| fail("creating it", e))?;
    // SAFETY: fsmount(2) takes only integers and returns a new descriptor or -1.
    owned(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            context.as_raw_fd(),
            libc::FSMOUNT_CLOEXEC,
            0,
        )
    })
    .map_err(|e| fail("fsmount", e))
}

/// fsconfig(2) on `context`: a flag or string `key`, or (without one) a command.
fn fsconfig(
    context: &OwnedFd,
    command: libc::c_uint,
    key: Option<&CStr>,
    value: Option<&CStr>,
) -> io::Result<()> {
    let pointer = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: fsconfig(2) reads only the NUL-terminated key and value where given, both
    // of which outlive the call, and writes no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            context.as_raw_fd(),
            command,
            pointer(key),
            pointer(value),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A descriptor a system call just returned (or its error).
fn owned(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(ret).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just made `fd`, a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option is on while the hierarchy is held: a mount of Kindling's hierarchy, made
    /// beside the held one, shows the kernel reused its root with `favordynmods`.
    #[test]
    fn the_named_hierarchy_carries_favordynmods() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED (host cannot): cgroup mounts need root");
            return;
        }
        if let Err(why) = enable() {
            assert!(
                why.starts_with("fsopen(cgroup)"),
                "this kernel has cgroup v1 but refused the option: {why}"
            );
            println!("SKIPPED (host cannot): no cgroup v1 in this kernel: {why}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().to_str().unwrap();
        let mounted = std::process::Command::new("mount")
            .args([
                "-t",
                "cgroup",
                "-o",
                "none,name=kindling-favordynmods",
                "cgroup",
            ])
            .arg(target)
            .status()
            .unwrap();
        assert!(mounted.success());
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = mountinfo
            .lines()
            .find(|l| l.contains(target))
            .expect("the second mount")
            .to_string();
        assert!(std::process::Command::new("umount")
            .arg(target)
            .status()
            .unwrap()
            .success());
        assert!(line.contains("favordynmods"), "{line}");
        assert_eq!(
            enable(),
            Ok(()),
            "a second call answers the first's outcome"
        );
    }
}
