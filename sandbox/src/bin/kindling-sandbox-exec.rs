//! `kindling-sandbox-exec PLAN.json`: the single-threaded helper that turns a launch
//! [`Plan`] into a running sandbox. Forking is only safe in a single-threaded process,
//! so the async host never forks itself; it runs this helper instead.
//!
//! Three processes, each doing what only it can:
//! - the helper (host root) joins the sandbox's cgroups, hands the sandbox's root what it
//!   must own (the cgroup files of its delegated cgroup, the Runtime API socket), forks
//!   the keeper and writes the keeper's user namespace maps, which only a process outside
//!   that namespace may write;
//! - the keeper unshares the user namespace, then, once mapped, the mount, PID, UTS, IPC,
//!   network and cgroup namespaces (all owned by the new user namespace), opens the host
//!   files of the guest root while it still has the host root's file access ([`Sources`]),
//!   and forks init;
//! - init's process becomes the namespace's root (an unprivileged id on the host), builds
//!   the guest root, and execs `init` as PID 1.
//!
//! The keeper stays as init's parent to reap it and tells the helper, which reports on
//! stdout, one line each (see `kindling_sandbox::plan::STATUS_*`): `ready <pid>` or
//! `error <reason>`, then `exited <reason>` when init is gone.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use kindling_sandbox::guest::{self, Sources};
use kindling_sandbox::plan::{IdMap, Plan, STATUS_ERROR, STATUS_EXITED, STATUS_READY};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::{unshare, CloneFlags};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{
    chown, fork, pipe2, setgroups, setresgid, setresuid, write, ForkResult, Gid, Pid, Uid,
};

/// The cgroup files the sandbox's root needs to make cgroups below a delegated one and
/// move its processes into them (the kernel's delegation contract); its limits stay the
/// host's.
const DELEGATED_FILES: [&str; 3] = ["cgroup.procs", "cgroup.threads", "cgroup.subtree_control"];

fn main() -> ExitCode {
    let Some(plan) = std::env::args_os().nth(1) else {
        report(STATUS_ERROR, "usage: kindling-sandbox-exec PLAN.json");
        return ExitCode::from(2);
    };
    match run(Path::new(&plan)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            report(STATUS_ERROR, &one_line(&err));
            ExitCode::FAILURE
        }
    }
}

fn report(status: &str, detail: &str) {
    // The host may have gone; there is no one left to tell then.
    let _ = writeln!(std::io::stdout(), "{status} {detail}");
}

fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}").replace('\n', " ")
}

/// The helper's part: prepares, starts the keeper, relays its reports; returns the exit
/// code to end with.
fn run(plan_path: &Path) -> Result<u8> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the sandbox helper needs root for namespaces, mounts, cgroups and id maps (it runs as uid {})",
            nix::unistd::geteuid()
        );
    }
    let plan: Plan = serde_json::from_slice(
        &fs::read(plan_path).with_context(|| format!("reading {}", plan_path.display()))?,
    )
    .with_context(|| format!("parsing {}", plan_path.display()))?;

    let me = std::process::id().to_string();
    for procs in &plan.cgroup_procs {
        fs::write(procs, &me).with_context(|| format!("joining {}", procs.display()))?;
    }
    hand_over(&plan)?;

    // unshared → (the keeper made its user namespace), mapped → (its ids are mapped),
    // reports ← (`ready`/`error` and `exited` lines, as the helper prints them).
    let (unshared_read, unshared_write) = pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
    let (mapped_read, mapped_write) = pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
    let (reports_read, reports_write) = pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
    // SAFETY: this helper is single-threaded, so the child owns a consistent copy of
    // the whole process (allocator included) until it execs or exits.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop((unshared_read, mapped_write, reports_read));
            let code = keep(&plan, unshared_write, mapped_read, &reports_write);
            #[expect(
                clippy::exit,
                reason = "the forked keeper ends here: it must never return into the helper's code"
            )]
            std::process::exit(code);
        }
        ForkResult::Parent { child: keeper } => {
            drop((unshared_write, mapped_read, reports_write));
            let mapped = wait_byte(unshared_read)
                .and_then(|()| map_ids(keeper, plan.id_map))
                .and_then(|()| write(&mapped_write, b"m").context("telling the keeper"));
            drop(mapped_write);
            if let Err(err) = mapped {
                wait_for(keeper);
                return Err(err.context("the sandbox's user namespace"));
            }
            let mut reported = false;
            for line in BufReader::new(File::from(reports_read)).lines() {
                let line = line.context("reading the keeper's reports")?;
                let _ = writeln!(std::io::stdout(), "{line}");
                reported = true;
            }
            let (reason, code) = wait_for(keeper);
            if !reported {
                bail!("the sandbox's keeper ended without a report: {reason}");
            }
            Ok(code)
        }
    }
}

/// Gives the sandbox's root what it must own: its delegated cgroups' control files and
/// the Runtime API socket (connecting needs write access to a socket).
fn hand_over(plan: &Plan) -> Result<()> {
    let root = (
        Some(Uid::from_raw(plan.id_map.root())),
        Some(Gid::from_raw(plan.id_map.root())),
    );
    let files = plan.delegate.iter().flat_map(|dir| {
        std::iter::once(dir.clone()).chain(DELEGATED_FILES.iter().map(|f| dir.join(f)))
    });
    for path in files.chain([plan.host_socket.clone()]) {
        chown(&path, root.0, root.1)
            .with_context(|| format!("handing {} to the sandbox", path.display()))?;
    }
    Ok(())
}

/// Reads one byte: the other side is ready. End of file means it failed.
fn wait_byte(read: OwnedFd) -> Result<()> {
    let mut byte = [0u8];
    match File::from(read).read(&mut byte) {
        Ok(1) => Ok(()),
        Ok(_) => bail!("the keeper ended before making its user namespace"),
        Err(e) => Err(e).context("waiting for the keeper"),
    }
}

/// Maps the keeper's user namespace: ids `0..count` onto the sandbox's host range.
fn map_ids(keeper: Pid, map: IdMap) -> Result<()> {
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{keeper}/{file}");
        fs::write(&path, map.line()).with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}

/// The keeper's part; returns its exit code. Whatever happens is reported on `reports`.
fn keep(plan: &Plan, unshared: OwnedFd, mapped: OwnedFd, reports: &OwnedFd) -> i32 {
    let tell = |status: &str, detail: &str| {
        let _ = write(reports, format!("{status} {detail}\n").as_bytes());
    };
    match start_init(plan, unshared, mapped) {
        Ok(init) => {
            tell(STATUS_READY, &init.to_string());
            let (reason, code) = wait_for(init);
            tell(STATUS_EXITED, &reason);
            i32::from(code)
        }
        Err(err) => {
            tell(STATUS_ERROR, &one_line(&err));
            1
        }
    }
}

/// Makes the namespaces, opens the guest root's sources and forks init; returns init's
/// PID as the host sees it.
fn start_init(plan: &Plan, unshared: OwnedFd, mapped: OwnedFd) -> Result<Pid> {
    // Die with the helper, and so with the host.
    set_pdeathsig(Signal::SIGKILL).context("prctl(PR_SET_PDEATHSIG)")?;
    unshare(CloneFlags::CLONE_NEWUSER)
        .map_err(|e| anyhow!("unshare(CLONE_NEWUSER): {e}: the sandbox needs user namespaces"))?;
    write(&unshared, b"u").context("telling the helper")?;
    drop(unshared);
    wait_byte(mapped).context("waiting for the id maps")?;
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWNET
            // The cgroup joined above becomes the root of the guest's cgroup2 mount.
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(|e| anyhow!("unshare: {e}: namespaces are unavailable (the sandbox needs root and a kernel with PID, mount, UTS, IPC, network and cgroup namespaces)"))?;
    // Opened in the new mount namespace (bind sources must belong to it), while this
    // process still has the host root's file access.
    let sources = Sources::open(plan)?;

    // The child writes why it failed here; a successful exec closes it empty.
    let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
    // SAFETY: the keeper is single-threaded (a fork of the single-threaded helper), so
    // the child owns a consistent copy of the whole process until it execs or exits.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop(read_end);
            let err = match set_pdeathsig(Signal::SIGKILL) {
                Ok(()) => become_root()
                    .and_then(|()| guest::enter(plan, &sources))
                    .unwrap_err(),
                Err(e) => anyhow!("prctl(PR_SET_PDEATHSIG): {e}"),
            };
            let _ = write(&write_end, format!("{err:#}").as_bytes());
            #[expect(
                clippy::exit,
                reason = "the forked child ends here: it must never return into the parent's code"
            )]
            std::process::exit(127);
        }
        ForkResult::Parent { child } => {
            drop(write_end);
            drop(sources);
            let mut failure = String::new();
            File::from(read_end)
                .read_to_string(&mut failure)
                .context("reading the child's status")?;
            if !failure.is_empty() {
                wait_for(child);
                bail!("{failure}");
            }
            Ok(child)
        }
    }
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

/// Reaps `pid` (init, or the keeper, which ends as init did); returns a one-line reason
/// and the exit code to pass on.
fn wait_for(pid: Pid) -> (String, u8) {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => {
                // An exit status is 0..=255; anything else is passed on as 255.
                let status = u8::try_from(code).unwrap_or(u8::MAX);
                return (format!("init exited with status {code}"), status);
            }
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                return (
                    format!("init was killed by {signal}"),
                    128u8.saturating_add(signal as u8),
                )
            }
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return (format!("waiting for init: {e}"), 1),
        }
    }
}
