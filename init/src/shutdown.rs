//! The end of the guest: stop every process, flush and unmount, then tell the kernel
//! (microVM) or the parent (sandbox) that the guest is done.

use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{sync, Pid};

use crate::cgroup::Workload;
use crate::config::Shutdown;
use crate::console::say;
use crate::mounts::Mounts;

/// How often to look for exited processes during the grace period.
const REAP_POLL: Duration = Duration::from_millis(10);
/// How long to wait for SIGKILLed processes to be gone.
const KILL_WAIT: Duration = Duration::from_secs(1);

/// How init leaves.
pub struct Exit {
    pub shutdown: Shutdown,
    pub sandbox: bool,
    pub grace: Duration,
}

/// Stops everything, then leaves: `reboot(2)` in a microVM (where the exit code is on the
/// console only). Returns `code` when init must exit with it instead, at once: in the sandbox,
/// or when reboot(2) failed. `main` does the exit.
#[must_use = "init must exit with the returned status"]
pub fn finish(exit: &Exit, mut mounts: Mounts, cgroup: Option<Workload>, code: i32) -> i32 {
    terminate_all(exit.grace);
    sync();
    if let Some(cgroup) = cgroup {
        if let Err(e) = cgroup.remove() {
            say!("{e:#}");
        }
    }
    if exit.sandbox {
        // The sandbox's mounts end with its mount namespace, when init exits.
        say!("exit with status {code}");
        return code;
    }
    mounts.unmount_all();
    sync();
    let (mode, name) = match exit.shutdown {
        Shutdown::Reboot => (RebootMode::RB_AUTOBOOT, "reboot"),
        Shutdown::Poweroff => (RebootMode::RB_POWER_OFF, "poweroff"),
    };
    say!("{name} (status {code})");
    let Err(e) = reboot(mode);
    say!("reboot(2) failed: {e}; exiting with status {code}");
    code
}

/// SIGTERM to every other process, up to `grace` for them to exit, then SIGKILL.
fn terminate_all(grace: Duration) {
    if reap_until_gone(Signal::SIGTERM, grace) {
        return;
    }
    say!(
        "processes left after {} ms, sending SIGKILL",
        grace.as_millis()
    );
    if !reap_until_gone(Signal::SIGKILL, KILL_WAIT) {
        say!("processes left after SIGKILL");
    }
}

/// Sends `signal` to all processes but init and reaps until none is left (true) or
/// `within` has passed (false).
fn reap_until_gone(signal: Signal, within: Duration) -> bool {
    // pid -1: every process this one may signal, except itself.
    if kill(Pid::from_raw(-1), signal) == Err(Errno::ESRCH) {
        return true;
    }
    let deadline = Instant::now() + within;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::ECHILD) => return true,
            Ok(WaitStatus::StillAlive) | Err(_) => {
                if Instant::now() >= deadline {
                    return false;
                }
                sleep(REAP_POLL);
            }
            Ok(_) => {}
        }
    }
}
