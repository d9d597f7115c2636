//! `kindling-sandbox-exec PLAN.json`: the single-threaded helper that turns a launch
//! [`Plan`] into a running sandbox. Forking is only safe in a single-threaded process,
//! so the async host never forks itself; it runs this helper instead.
//!
//! Four processes, each doing what only it can:
//! - the helper (host root) makes itself die with the host, joins the sandbox's cgroups,
//!   hands the sandbox's root what it must own (the cgroup files of its delegated cgroup,
//!   the Runtime API socket) and forks the keeper;
//! - the keeper (host root) has a short-lived child make the sandbox's user namespace and,
//!   owned by it, its network, UTS and IPC namespaces; it maps the user namespace's ids
//!   (only a process outside may), keeps a handle to each namespace, unshares the PID
//!   namespace for its next child and forks init;
//! - init's process, still host root and PID 1 of the new PID namespace, builds the guest
//!   root in a mount namespace of the host's user namespace, then joins the sandbox's user
//!   namespace, whose own mount namespace gets the tree locked ([`guest::enter`]), becomes
//!   the namespace's root (an unprivileged id on the host) and execs `init`.
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
use kindling_plumbing::lifetime;
use kindling_sandbox::guest::{self, Namespaces};
use kindling_sandbox::plan::{IdMap, Plan, STATUS_ERROR, STATUS_EXITED, STATUS_READY};
use kindling_wire::monotonic_ns;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::{unshare, CloneFlags};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chown, fork, pipe2, write, ForkResult, Gid, Pid, Uid};

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
    lifetime::die_with_parent(plan.host_pid).context("dying with the host")?;

    let me = std::process::id().to_string();
    for procs in &plan.cgroup_procs {
        fs::write(procs, &me).with_context(|| format!("joining {}", procs.display()))?;
    }
    hand_over(&plan)?;

    // reports ← (`ready`/`error` and `exited` lines, as the helper prints them).
    let (reports_read, reports_write) = pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
    // SAFETY: this helper is single-threaded, so the child owns a consistent copy of
    // the whole process (allocator included) until it execs or exits.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop(reports_read);
            let code = keep(&plan, &reports_write);
            #[expect(
                clippy::exit,
                reason = "the forked keeper ends here: it must never return into the helper's code"
            )]
            std::process::exit(code);
        }
        ForkResult::Parent { child: keeper } => {
            drop(reports_write);
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

/// The keeper's part; returns its exit code. Whatever happens is reported on `reports`.
fn keep(plan: &Plan, reports: &OwnedFd) -> i32 {
    let tell = |status: &str, detail: &str| {
        let _ = write(reports, format!("{status} {detail}\n").as_bytes());
    };
    match start_init(plan) {
        Ok(init) => {
            tell(STATUS_READY, &format!("{init} {}", monotonic_ns()));
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

/// Makes the namespaces and forks init into them; returns init's PID as the host sees it.
fn start_init(plan: &Plan) -> Result<Pid> {
    // Die with the helper, and so with the host.
    set_pdeathsig(Signal::SIGKILL).context("prctl(PR_SET_PDEATHSIG)")?;
    let namespaces = make_namespaces(plan.id_map)?;
    // The next child is the first process, PID 1, of the new PID namespace. It belongs to
    // the host's user namespace: a PID namespace can only be joined once it has its init,
    // and init's process must be host root in it to mount its /proc for the locked tree.
    unshare(CloneFlags::CLONE_NEWPID).context("unshare(CLONE_NEWPID)")?;

    // The child writes why it failed here; a successful exec closes it empty.
    let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
    // SAFETY: the keeper is single-threaded (a fork of the single-threaded helper), so
    // the child owns a consistent copy of the whole process until it execs or exits.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop(read_end);
            let err = match set_pdeathsig(Signal::SIGKILL) {
                Ok(()) => guest::enter(plan, &namespaces).unwrap_err(),
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
            drop(namespaces);
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

/// What the namespace maker writes once its namespaces exist.
const NAMESPACES_MADE: u8 = b'u';

/// Has a child make the sandbox's user namespace and the network, UTS and IPC namespaces
/// it owns, maps the user namespace's ids `0..count` onto the sandbox's host range, and
/// returns handles to them.
fn make_namespaces(map: IdMap) -> Result<Namespaces> {
    // made ← (one byte, or why it failed), done → (closed: the child may go).
    let (made_read, made_write) = pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
    let (done_read, done_write) = pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
    // SAFETY: the keeper is single-threaded, so the child owns a consistent copy of the
    // whole process until it exits.
    let maker = match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop((made_read, done_write));
            // With CLONE_NEWUSER the user namespace is made first and owns the others.
            let made = unshare(
                CloneFlags::CLONE_NEWUSER
                    | CloneFlags::CLONE_NEWNET
                    | CloneFlags::CLONE_NEWUTS
                    | CloneFlags::CLONE_NEWIPC,
            );
            let word = match &made {
                Ok(()) => vec![NAMESPACES_MADE],
                Err(e) => {
                    format!("unshare: {e}: the sandbox needs user, network, UTS and IPC namespaces")
                        .into_bytes()
                }
            };
            let _ = write(&made_write, &word);
            drop(made_write);
            if made.is_ok() {
                // Holds the namespaces until the keeper has its handles (or is gone).
                let _ = File::from(done_read).read(&mut [0u8]);
            }
            let code = i32::from(made.is_err());
            #[expect(
                clippy::exit,
                reason = "the forked namespace maker ends here: it must never return into the keeper's code"
            )]
            std::process::exit(code);
        }
        ForkResult::Parent { child } => child,
    };
    drop((made_write, done_read));
    let handles = namespaces_made(made_read).and_then(|()| {
        map_ids(maker, map)?;
        let open = |name: &str| -> Result<OwnedFd> {
            let path = format!("/proc/{maker}/ns/{name}");
            nix::fcntl::open(
                path.as_str(),
                OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .with_context(|| format!("opening {path}"))
        };
        Ok(Namespaces {
            user: open("user")?,
            net: open("net")?,
            uts: open("uts")?,
            ipc: open("ipc")?,
        })
    });
    drop(done_write);
    wait_for(maker);
    handles.context("the sandbox's namespaces")
}

/// Waits for the namespace maker's byte; anything else is why it failed.
fn namespaces_made(made: OwnedFd) -> Result<()> {
    let mut said = Vec::new();
    File::from(made)
        .read_to_end(&mut said)
        .context("waiting for the namespaces")?;
    match said.as_slice() {
        [NAMESPACES_MADE] => Ok(()),
        [] => bail!("the namespace maker ended without a word"),
        why => bail!("{}", String::from_utf8_lossy(why)),
    }
}

/// Maps the user namespace of `pid`: ids `0..count` onto the sandbox's host range.
fn map_ids(pid: Pid, map: IdMap) -> Result<()> {
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{pid}/{file}");
        fs::write(&path, map.line()).with_context(|| format!("writing {path}"))?;
    }
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
