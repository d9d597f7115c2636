//! Host processes watched through a flood (issue 9's adversarial suites): each one's peak
//! resident memory (the kernel's high-water mark, reset at the start) and peak number of
//! open fds (sampled every 5 ms), printed as bounded figures, not timings.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A process's resident memory now, in KiB (0 once it has gone).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A process's open fds now.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One watched process.
struct Watched {
    name: String,
    pid: u32,
    before_kib: u64,
    before_fds: usize,
    peak_fds: Arc<AtomicUsize>,
}

/// What a [`Gauge`] saw of one process.
#[derive(Debug)]
pub struct Peaks {
    pub name: String,
    pub before_kib: u64,
    pub rss_kib: u64,
    pub before_fds: usize,
    pub fds: usize,
}

impl Peaks {
    /// An error unless the peak RSS stayed within `headroom_kib` of the RSS before.
    pub fn within(&self, what: &str, headroom_kib: u64) -> Result<(), String> {
        if self.rss_kib <= self.before_kib + headroom_kib {
            return Ok(());
        }
        Err(format!(
            "{what}: {} grew past {} MiB: {self:?}",
            self.name,
            headroom_kib >> 10
        ))
    }
}

/// Watches processes through one flood.
pub struct Gauge {
    what: String,
    watched: Vec<Watched>,
    stop: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<()>,
}

impl Gauge {
    /// Starts watching `processes`, `(name, pid)` pairs, through the flood `what`.
    pub fn start(what: &str, processes: &[(&str, u32)]) -> Gauge {
        let watched: Vec<Watched> = processes
            .iter()
            .map(|&(name, pid)| {
                // "5" resets the peak resident set size (VmHWM) to the current one.
                std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
                    .unwrap_or_else(|e| panic!("resetting {name}'s VmHWM: {e}"));
                Watched {
                    name: name.to_string(),
                    pid,
                    before_kib: rss_kib(pid),
                    before_fds: fds(pid),
                    peak_fds: Arc::new(AtomicUsize::new(fds(pid))),
                }
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            let sampled: Vec<(u32, Arc<AtomicUsize>)> = watched
                .iter()
                .map(|w| (w.pid, w.peak_fds.clone()))
                .collect();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (pid, peak) in &sampled {
                        peak.fetch_max(fds(*pid), Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Gauge {
            what: what.to_string(),
            watched,
            stop,
            sampler,
        }
    }

    /// Stops watching; prints and returns each process's peaks, in the order given.
    pub fn finish(self) -> Vec<Peaks> {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.join().expect("the sampler");
        self.watched
            .into_iter()
            .map(|w| {
                let peaks = Peaks {
                    rss_kib: status_kib(w.pid, "VmHWM:"),
                    fds: w.peak_fds.load(Ordering::Relaxed),
                    name: w.name,
                    before_kib: w.before_kib,
                    before_fds: w.before_fds,
                };
                if peaks.rss_kib == 0 {
                    println!("flood {:<40} {} ended during it", self.what, peaks.name);
                } else {
                    println!(
                        "flood {:<40} {} peak RSS {:>4} MiB (before {:>3} MiB), peak fds {:>5} (before {})",
                        self.what,
                        peaks.name,
                        peaks.rss_kib >> 10,
                        peaks.before_kib >> 10,
                        peaks.fds,
                        peaks.before_fds
                    );
                }
                peaks
            })
            .collect()
    }
}
