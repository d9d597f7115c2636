//! Runs the bootstrap as PID 1 must: reaps every child (orphans re-parented to init
//! included), forwards the signals a workload cares about to the bootstrap's process
//! group, and applies the restart policy when the bootstrap exits.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{setsid, Pid};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;

use crate::cgroup::Workload;
use crate::config::{Config, Restart};
use crate::console::{say, uptime};

/// Pause before a restart, so that a bootstrap that fails at once does not spin.
const RESTART_DELAY: Duration = Duration::from_millis(100);

/// Signals passed on to the bootstrap's process group.
const FORWARDED: [i32; 5] = [SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2];

pub struct Supervisor<'a> {
    config: &'a Config,
    cgroup: Option<&'a Workload>,
    signals: Signals,
}

impl<'a> Supervisor<'a> {
    /// Installs the signal handlers; must happen before the first child exists, so that
    /// no SIGCHLD or forwarded signal is lost.
    pub fn new(config: &'a Config, cgroup: Option<&'a Workload>) -> Result<Self> {
        let signals =
            Signals::new(FORWARDED.iter().chain(&[SIGCHLD])).context("install signal handlers")?;
        Ok(Self {
            config,
            cgroup,
            signals,
        })
    }

    /// Runs the bootstrap until the restart policy says it is done, and returns its last
    /// exit status as an exit code (128 + signal when a signal killed it). A SIGTERM or
    /// SIGINT to init ends restarting.
    pub fn run(&mut self) -> Result<i32> {
        let mut stopping = false;
        loop {
            let child = self.spawn()?;
            say!("bootstrap started at {:.3} s (pid {child})", uptime());
            let code = self.wait_for(child, &mut stopping);
            say!("bootstrap exited with status {code}");
            if stopping || !restarts(self.config.restart, code) {
                return Ok(code);
            }
            // What the old bootstrap left behind in its group must not see the new one.
            let _ = killpg(child, Signal::SIGKILL);
            sleep(RESTART_DELAY);
            say!("restarting bootstrap");
        }
    }

    fn spawn(&self) -> Result<Pid> {
        let config = self.config;
        let join_cgroup = self.cgroup.map(Workload::join_hook);
        let mut command = Command::new(&config.bootstrap);
        command
            .args(&config.bootstrap_args)
            .env_clear()
            .envs(config.bootstrap_env())
            .current_dir("/")
            .stdin(Stdio::null());
        // SAFETY: the hook runs between fork and exec, so it may only make
        // async-signal-safe calls: setsid(2) and the cgroup hook's single write(2).
        unsafe {
            command.pre_exec(move || {
                setsid().map_err(io::Error::from)?;
                join_cgroup.as_ref().map_or(Ok(()), |join| join())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("start bootstrap {}", config.bootstrap.display()))?;
        let pid = i32::try_from(child.id()).context("bootstrap pid")?;
        // The child is reaped by waitpid(-1) below, not through `child`.
        drop(child);
        Ok(Pid::from_raw(pid))
    }

    /// Handles signals until `child` has exited; returns its exit code.
    fn wait_for(&mut self, child: Pid, stopping: &mut bool) -> i32 {
        loop {
            let batch: Vec<i32> = self.signals.wait().collect();
            for signal in batch {
                if signal == SIGCHLD {
                    continue;
                }
                *stopping |= signal == SIGTERM || signal == SIGINT;
                forward(child, signal);
            }
            if let Some(status) = reap_all(Some(child)) {
                return exit_code(status);
            }
        }
    }
}

fn restarts(policy: Restart, code: i32) -> bool {
    match policy {
        Restart::Never => false,
        Restart::OnFailure => code != 0,
        Restart::Always => true,
    }
}

/// Sends `signal` to the bootstrap's process group, or to the bootstrap alone if it
/// has not yet made its group (a signal that arrives right after fork).
fn forward(child: Pid, signal: i32) {
    let Ok(signal) = Signal::try_from(signal) else {
        return;
    };
    if killpg(child, signal) == Err(Errno::ESRCH) {
        let _ = kill(child, signal);
    }
}

/// Reaps every child that has exited, without blocking; returns the status of `wanted`
/// when it was among them.
pub fn reap_all(wanted: Option<Pid>) -> Option<WaitStatus> {
    let mut found = None;
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
        if status.pid().is_some() && status.pid() == wanted {
            found = Some(status);
        }
    }
    found
}

/// Shell and tini convention: the exit code, or 128 + the signal that killed it.
pub fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, signal, _) => 128 + signal as i32,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        let pid = Pid::from_raw(7);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 3)), 3);
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGSEGV, true)),
            139
        );
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGTERM, false)),
            143
        );
    }

    #[test]
    fn restart_policies() {
        assert!(!restarts(Restart::Never, 1));
        assert!(restarts(Restart::OnFailure, 1));
        assert!(!restarts(Restart::OnFailure, 0));
        assert!(restarts(Restart::Always, 0));
    }
}
