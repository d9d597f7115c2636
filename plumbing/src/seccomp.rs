//! The seccomp denylist that the function's runtime (under the bootstrap), init and the
//! agent in the sandbox, and every program kindling-jailer starts (kindling-vmm, QEMU,
//! vhost-device-vsock) run under: it refuses (EPERM) what Docker's default profile
//! refuses a container — mounts, namespaces, modules, kexec, bpf, perf, keyrings,
//! userfaultfd, io_uring (as Docker since v25: the operations of a ring bypass this very
//! filter), reboot, the clock, swap — and vsock sockets (only the bootstrap talks to the
//! host). A denylist, not an allowlist: it sits under programs Kindling does not write
//! (language runtimes, QEMU), beneath kindling-vmm's own per-thread allowlists.

use std::io;

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// System calls a function or a VMM never needs and an attacker inside one would want.
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
    // Programs that try io_uring (libuv in Node.js, QEMU's event loop) fall back to plain
    // system calls on EPERM.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
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

/// The filters, built before the fork (building allocates): the denylist
/// (EPERM), and `clone3` answered ENOSYS, as Docker does — its flags sit in memory a
/// filter cannot read, and glibc then falls back to `clone`, whose flags it can.
pub fn denylist_filters() -> Result<[BpfProgram; 2], String> {
    let fail = |e: seccompiler::BackendError| format!("building the seccomp denylist: {e}");
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
    // The host's vsock ports are the bootstrap's alone (Docker's profile refuses AF_VSOCK too).
    let vsock = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::from(libc::AF_VSOCK.unsigned_abs()),
    )
    .map_err(fail)?;
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![vsock]).map_err(fail)?],
    );
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
/// `no_new_privs` (see [`crate::privileges::drop_to`]). Async-signal-safe: a forked child
/// calls it before exec.
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

/// Installs `filters` on the calling thread as [`apply`] does, but without setting
/// `no_new_privs`: for a process that holds `CAP_SYS_ADMIN` in its user namespace (which
/// seccomp(2) accepts instead) and whose children must still gain capabilities when they
/// exec (init, whose root agent gets its set from its exec). Not for a forked child: it
/// allocates.
pub fn apply_as_namespace_admin(filters: &[BpfProgram; 2]) -> io::Result<()> {
    for filter in filters {
        let program: Vec<libc::sock_filter> = filter
            .iter()
            .map(|i| libc::sock_filter {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            })
            .collect();
        let prog = libc::sock_fprog {
            len: u16::try_from(program.len())
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            filter: program.as_ptr().cast_mut(),
        };
        // SAFETY: seccomp(2) copies the `len` instructions that `prog` points at, all in
        // `program`, which outlives the call; it writes no memory of ours.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                std::ptr::addr_of!(prog),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
