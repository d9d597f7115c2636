//! The jailer's own process around the jailed one. A new PID namespace takes effect for
//! children only, so the jailer forks: the child becomes PID 1 of the new namespace (and
//! execs the program); the jailer stays, unjailed but doing nothing a guest can reach, as
//! the process that whoever started it sees — it forwards the termination signals to the
//! child, ends as the child ended (the same exit code, or the same signal), and cleans up.
//! The child dies with it (`PR_SET_PDEATHSIG`, set after the child's last uid change).

use std::process::ExitCode;

use anyhow::Context;
use nix::errno::Errno;
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, raise, sigprocmask, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

/// What the child gets when the jailer gets it: Ctrl-Alt-Del for kindling-vmm (SIGTERM),
/// and the rest of what a terminal or a supervisor sends.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Closes every fd but stdin, stdout, stderr and `keep`: nothing else the jailer's caller
/// had open reaches the jailed program.
pub fn close_inherited_fds(keep: &[i32]) -> anyhow::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .collect();
    keep.sort_unstable();
    let mut first = 3u32;
    for fd in keep.into_iter().filter(|&fd| fd >= 3) {
        if fd > first {
            close_range(first, fd - 1)?;
        }
        first = fd.saturating_add(1);
    }
    close_range(first, u32::MAX)
}

/// Closes the fds `first..=last`.
fn close_range(first: u32, last: u32) -> anyhow::Result<()> {
    // SAFETY: close_range(2) takes integers only; no fd above 2 is owned by Rust code
    // yet (the jailer has opened nothing so far), so no owner is left dangling.
    let rc = unsafe { nix::libc::syscall(nix::libc::SYS_close_range, first, last, 0) };
    Errno::result(rc).context("closing the inherited file descriptors")?;
    Ok(())
}

/// Which side of the fork this is.
#[derive(Debug)]
pub enum Forked {
    Child,
    Parent(Pid),
}

/// Forks a child into a new PID namespace. The forwarded signals and SIGCHLD are blocked
/// first (so none is lost before [`wait`] takes them), and unblocked in the child again.
pub fn fork_into_new_pid_namespace() -> anyhow::Result<Forked> {
    let mut old = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&relayed()), Some(&mut old))?;
    unshare(CloneFlags::CLONE_NEWPID).context("entering a new PID namespace")?;
    // SAFETY: the jailer is single-threaded (it starts no thread), so the child inherits
    // no lock held by another thread and may run ordinary code until it execs.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None)?;
            Ok(Forked::Child)
        }
        ForkResult::Parent { child } => Ok(Forked::Parent(child)),
    }
}

fn relayed() -> SigSet {
    let mut set: SigSet = FORWARDED.into_iter().collect();
    set.add(Signal::SIGCHLD);
    set
}

/// How the child ended.
#[derive(Debug, Clone, Copy)]
pub enum Ended {
    Exited(i32),
    Killed(Signal),
}

/// Forwards signals to `child` until it ends.
pub fn wait(child: Pid) -> anyhow::Result<Ended> {
    let set = relayed();
    loop {
        let signal = set.wait()?;
        if signal != Signal::SIGCHLD {
            // ESRCH: it is ending anyway; its SIGCHLD follows.
            let _ = kill(child, signal);
            continue;
        }
        match waitpid(child, Some(WaitPidFlag::WNOHANG))? {
            WaitStatus::Exited(_, code) => return Ok(Ended::Exited(code)),
            WaitStatus::Signaled(_, signal, _) => return Ok(Ended::Killed(signal)),
            _ => {}
        }
    }
}

impl Ended {
    /// Ends the jailer the way the child ended: a signal is raised again at the jailer
    /// (with its default action), so that the caller sees `signal: 9`, not a code.
    pub fn mirror(self) -> ExitCode {
        match self {
            Ended::Exited(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Ended::Killed(signal) => {
                // SAFETY: restoring the default action installs no handler of ours.
                let _ = unsafe { nix::sys::signal::signal(signal, SigHandler::SigDfl) };
                let mut only = SigSet::empty();
                only.add(signal);
                let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&only), None);
                let _ = raise(signal);
                // A signal whose default is to be ignored: the shell's convention.
                ExitCode::from(128 + u8::try_from(signal as i32).unwrap_or(0))
            }
        }
    }
}
