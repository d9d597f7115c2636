//! Dropping root for good: the function's runtime (in the bootstrap) and the jailed VMM
//! (in kindling-jailer) both leave uid 0 the same way, with every capability set empty
//! and `no_new_privs`, so that no set-uid binary or file capability gives any of it back.

use std::io;

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

/// Drops the calling process to `uid`/`gid` for good: no capabilities left in any set
/// (effective, permitted, inheritable, ambient, bounding), no supplementary group but
/// `gid`, `no_new_privs`. Makes only async-signal-safe system calls and allocates nothing,
/// so a forked child may call it before exec.
pub fn drop_to(uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
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
    let groups = [gid];
    // SAFETY: `groups` outlives the call and holds exactly the one gid we pass.
    check(unsafe { libc::setgroups(1, groups.as_ptr()) })?;
    // SAFETY: plain id changes; no memory is passed.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: as above. Leaving uid 0 empties the effective and permitted sets.
    check(unsafe { libc::setresuid(uid, uid, uid) })?;
    // The inheritable set survives a uid change: empty every set explicitly (always
    // allowed), which also covers a `uid` of 0.
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
