//! The runtime's credentials. The function's runtime, and everything it starts, runs as an
//! unprivileged user (Lambda's `sbx_user1051`, uid 993, unless init says otherwise) with
//! every capability set empty — effective, permitted, inheritable, ambient and bounding —
//! and `no_new_privs`, so that no set-uid binary or file capability gives any of it back.
//! The agent itself stays root: it moves the runtime into its cgroup and sets the clock.

use std::io;

use kindling_wire::RuntimeUser;
use nix::libc;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Drops the calling process to `user` for good: no capabilities left in any set, no
/// supplementary groups but the user's own, `no_new_privs`. Called in the forked child
/// before exec, so it makes only async-signal-safe system calls and allocates nothing.
pub fn drop_to(user: RuntimeUser) -> io::Result<()> {
    // The bounding set first: dropping from it needs CAP_SETPCAP, gone after setresuid.
    // Capability numbers run from 0 to the kernel's last; past it prctl says EINVAL.
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_DROP takes a capability number and touches no memory.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } == -1 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(err);
        }
    }
    // SAFETY: clearing the ambient set takes no pointers.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })?;
    let groups = [user.gid];
    // SAFETY: `groups` outlives the call and holds exactly the one gid we pass.
    check(unsafe { libc::setgroups(1, groups.as_ptr()) })?;
    // SAFETY: plain id changes; no memory is passed.
    check(unsafe { libc::setresgid(user.gid, user.gid, user.gid) })?;
    // SAFETY: as above. Leaving uid 0 empties the effective and permitted sets.
    check(unsafe { libc::setresuid(user.uid, user.uid, user.uid) })?;
    // The inheritable set survives a uid change: empty every set explicitly (always
    // allowed), which also covers a `user` of 0.
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a v3 header and two data words, both live for the call.
    if unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS takes only integers.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
}
