//! The runtime's credentials. The function's runtime, and everything it starts, runs as an
//! unprivileged user (Lambda's `sbx_user1051`, uid 993, unless init says otherwise) with
//! every capability set empty — effective, permitted, inheritable, ambient and bounding —
//! and `no_new_privs`, so that no set-uid binary or file capability gives any of it back,
//! and under a seccomp filter that refuses (EPERM) what Docker's default profile refuses a
//! container: mounts, namespaces, modules, kexec, bpf, perf, keyrings, userfaultfd, reboot,
//! the clock, swap. The agent itself stays root: it moves the runtime into its cgroup and
//! sets the clock.

use std::io;

use kindling_wire::RuntimeUser;
use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

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

/// System calls a function never needs and an attacker inside one would want.
const DENIED: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_open_by_handle_at,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_quotactl,
    libc::SYS_vhangup,
    libc::SYS_syslog,
    libc::SYS_lookup_dcookie,
];

/// `clone` flags that would make new namespaces.
const NAMESPACE_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWCGROUP,
];

/// The runtime's seccomp filters, built before the fork (building allocates): the denylist
/// (EPERM), and `clone3` answered ENOSYS, as Docker does — its flags sit in memory a
/// filter cannot read, and glibc then falls back to `clone`, whose flags it can.
pub fn runtime_filters() -> Result<[BpfProgram; 2], String> {
    let fail = |e: seccompiler::BackendError| format!("building the runtime's seccomp filter: {e}");
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let flag = u64::from(flag.unsigned_abs());
            let namespace = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?;
            SeccompRule::new(vec![namespace])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(fail)?;
    rules.insert(libc::SYS_clone, clone_rules);
    let errno = |e: i32| SeccompAction::Errno(e.unsigned_abs());
    let denylist = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        errno(libc::EPERM),
        TargetArch::x86_64,
    )
    .map_err(fail)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into(),
        SeccompAction::Allow,
        errno(libc::ENOSYS),
        TargetArch::x86_64,
    )
    .map_err(fail)?;
    let program = |f: SeccompFilter| BpfProgram::try_from(f).map_err(fail);
    Ok([program(denylist)?, program(clone3)?])
}

/// Installs `filters` on the calling thread (its children inherit them). Needs
/// `no_new_privs` (see [`drop_to`]). Called in the forked child before exec.
pub fn apply(filters: &[BpfProgram; 2]) -> io::Result<()> {
    for filter in filters {
        // No formatting here: the forked child must not allocate.
        seccompiler::apply_filter(filter).map_err(|e| match e {
            seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
            _ => io::Error::from(io::ErrorKind::InvalidInput),
        })?;
    }
    Ok(())
}
