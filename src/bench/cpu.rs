//! What warm invokes cost in CPU and what the server holds: the bench's process is the
//! server (its client runs on a thread of its own, whose CPU is taken out), its
//! descendants are the environments (sandboxed runtimes, hypervisors and their helpers).
//! CPU times are the kernel's nanosecond counters (`CLOCK_*_CPUTIME_ID`, and the
//! first field of `/proc/PID/task/TID/schedstat`), not `/proc/PID/stat`'s ticks: a
//! warm invoke takes tens of µs, a tick is 10 ms.

use std::time::Duration;

use anyhow::Context as _;
use nix::time::{clock_gettime, ClockId};
use procfs::process::Process;

use super::rss;

/// CPU time so far of the server, of the calling thread (the client) and of the
/// environments.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    process: Duration,
    thread: Duration,
    environments: Duration,
}

/// CPU spent between two [`CpuSample`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuSpent {
    /// The server: the bench's process less its client's thread.
    pub server: Duration,
    /// The environments: every descendant process, all their threads.
    pub environments: Duration,
}

impl CpuSample {
    /// Now; to be taken on the client's thread.
    pub fn now() -> anyhow::Result<Self> {
        Ok(Self {
            process: cpu_clock(ClockId::CLOCK_PROCESS_CPUTIME_ID)?,
            thread: cpu_clock(ClockId::CLOCK_THREAD_CPUTIME_ID)?,
            environments: descendants_cpu()?,
        })
    }

    /// What was spent since `self`, from a sample taken on the same thread.
    pub fn until(&self, later: &CpuSample) -> CpuSpent {
        let process = later.process.saturating_sub(self.process);
        let thread = later.thread.saturating_sub(self.thread);
        CpuSpent {
            server: process.saturating_sub(thread),
            environments: later.environments.saturating_sub(self.environments),
        }
    }
}

/// CPU time so far on the clock `id` (this process's or this thread's).
pub fn cpu_clock(id: ClockId) -> anyhow::Result<Duration> {
    Ok(Duration::from(
        clock_gettime(id).context("cannot read a CPU clock")?,
    ))
}

/// CPU time of every thread of this process's descendants.
fn descendants_cpu() -> anyhow::Result<Duration> {
    let mut total = Duration::ZERO;
    for process in rss::descendants()? {
        // A process or thread may end while we look: it then counts for nothing.
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", process.pid)) else {
            continue;
        };
        for task in tasks.flatten() {
            let ns = std::fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
            total += Duration::from_nanos(ns.unwrap_or(0));
        }
    }
    Ok(total)
}

/// What the server holds: resident memory and open file descriptors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub rss_bytes: u64,
    pub fds: usize,
}

impl Held {
    pub fn now() -> anyhow::Result<Self> {
        let me = Process::myself()?;
        Ok(Self {
            rss_bytes: me.status()?.vmrss.unwrap_or(0) * 1024,
            fds: me.fd_count().context("cannot count this process's fds")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that burns CPU shows up as environment CPU; the calling thread's own work
    /// is not the server's. (Other tests run beside this one in the process and spawn
    /// children: nothing here bounds what they spend.)
    #[test]
    fn a_busy_child_counts_and_the_client_thread_does_not() {
        let before = CpuSample::now().unwrap();
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 5",
            ])
            .spawn()
            .expect("sh runs");
        // The client's own work: 50 ms of this thread's CPU, however loaded the machine.
        let thread_cpu =
            || Duration::from(clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap());
        let spin = thread_cpu();
        while thread_cpu() - spin < Duration::from_millis(50) {
            std::hint::black_box(spin);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let after = loop {
            let after = CpuSample::now().unwrap();
            let counted = before.until(&after).environments > Duration::from_millis(1);
            if counted || std::time::Instant::now() > deadline {
                break after;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = child.kill();
        child.wait().expect("sh is reaped");
        let spent = before.until(&after);
        assert!(spent.environments > Duration::from_millis(1), "{spent:?}");
        let client = after.thread - before.thread;
        assert!(client >= Duration::from_millis(50), "{client:?}");
        assert_eq!(spent.server + client, after.process - before.process);
        let held = Held::now().unwrap();
        assert!(held.fds > 2 && held.rss_bytes > 0, "{held:?}");
    }
}
