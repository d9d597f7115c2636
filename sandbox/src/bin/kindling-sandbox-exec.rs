//! `kindling-sandbox-exec PLAN.json`: the single-threaded helper that turns a launch
//! [`Plan`] into a running sandbox. Forking is only safe in a single-threaded process,
//! so the async host never forks itself; it runs this helper instead.
//!
//! The helper joins the sandbox's cgroups, unshares the PID, mount, UTS, IPC, network and
//! cgroup namespaces and forks: the child becomes PID 1 of the new PID namespace, builds the
//! guest root and execs `init`. The helper stays as init's parent to reap it, and reports
//! on stdout, one line each (see `kindling_sandbox::plan::STATUS_*`):
//! `ready <pid>` or `error <reason>`, then `exited <reason>` when init is gone.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use kindling_sandbox::guest;
use kindling_sandbox::plan::{Plan, STATUS_ERROR, STATUS_EXITED, STATUS_READY};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::{unshare, CloneFlags};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pipe2, write, ForkResult, Pid};

fn main() -> ExitCode {
    let Some(plan) = std::env::args_os().nth(1) else {
        report(STATUS_ERROR, "usage: kindling-sandbox-exec PLAN.json");
        return ExitCode::from(2);
    };
    match launch(Path::new(&plan)) {
        Ok(init) => {
            report(STATUS_READY, &init.to_string());
            let (reason, code) = wait_for(init);
            report(STATUS_EXITED, &reason);
            ExitCode::from(code)
        }
        Err(err) => {
            report(STATUS_ERROR, &format!("{err:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn report(status: &str, detail: &str) {
    // The host may have gone; there is no one left to tell then.
    let _ = writeln!(std::io::stdout(), "{status} {detail}");
}

/// Starts init in fresh namespaces and returns its PID (as seen on the host).
fn launch(plan_path: &Path) -> Result<Pid> {
    let plan: Plan = serde_json::from_slice(
        &fs::read(plan_path).with_context(|| format!("reading {}", plan_path.display()))?,
    )
    .with_context(|| format!("parsing {}", plan_path.display()))?;

    let me = std::process::id().to_string();
    for procs in &plan.cgroup_procs {
        fs::write(procs, &me).with_context(|| format!("joining {}", procs.display()))?;
    }
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

    // The child writes why it failed here; a successful exec closes it empty.
    let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
    // SAFETY: this helper is single-threaded, so the child owns a consistent copy of
    // the whole process (allocator included) until it execs or exits.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop(read_end);
            // Die with the helper, so that a killed host leaves no sandbox behind.
            let err = match set_pdeathsig(Signal::SIGKILL) {
                Ok(()) => guest::enter(&plan).unwrap_err(),
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

/// Reaps init; returns a one-line reason and the helper's exit code.
fn wait_for(init: Pid) -> (String, u8) {
    loop {
        match waitpid(init, None) {
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
