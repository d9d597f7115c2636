//! What the VMM measures about itself: its own memory footprint (resident set size without
//! guest RAM, read from `/proc/self/smaps`; guest RAM is the mappings that back the guest
//! memory regions), the phases of building a VM ([`record_phase`]), and the guest's boot
//! milestones as they pass on its console ([`ConsoleMilestones`]), for `--timings`.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The VMM's set-up phases so far, in the order they ran (one VM per process).
static PHASES: Mutex<Vec<(&'static str, Duration)>> = Mutex::new(Vec::new());

/// Records that set-up phase `name` took `took`.
pub fn record_phase(name: &'static str, took: Duration) {
    PHASES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((name, took));
}

/// The set-up phases recorded so far.
pub fn phases() -> Vec<(&'static str, Duration)> {
    PHASES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The lines Kindling's init prints at its boot milestones, each followed by the guest's
/// own seconds since its kernel started (`init: userspace at 1.234 s`).
pub const GUEST_MILESTONES: [(&str, &str); 2] = [
    ("userspace", "init: userspace at "),
    ("bootstrap_started", "init: bootstrap started at "),
];

/// One guest milestone as the VMM saw it pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Milestone {
    pub name: &'static str,
    /// Instance start to the line on the console (the host's clock).
    pub at: Duration,
    /// The guest's own figure: its kernel's start to the milestone.
    pub guest_seconds: Option<f64>,
}

/// The guest milestones seen so far.
pub type Milestones = Arc<Mutex<Vec<Milestone>>>;

/// Longest console line looked at: init's milestone lines are short, and a guest printing
/// endless lines costs a bounded buffer.
const LINE_CAP: usize = 160;

/// A console sink that passes everything on to `inner` and notes when each of
/// [`GUEST_MILESTONES`] passes.
pub struct ConsoleMilestones<W> {
    inner: W,
    start: Instant,
    line: Vec<u8>,
    seen: Milestones,
}

impl<W> std::fmt::Debug for ConsoleMilestones<W> {
    /// Without the sink, which is any writer.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleMilestones")
            .field("start", &self.start)
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl<W: Write> ConsoleMilestones<W> {
    /// Counts from `start` (the instance start); the milestones appear in `seen`.
    pub fn new(inner: W, start: Instant, seen: Milestones) -> Self {
        Self {
            inner,
            start,
            line: Vec::with_capacity(LINE_CAP),
            seen,
        }
    }

    fn end_of_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line);
        for (name, prefix) in GUEST_MILESTONES {
            let Some(rest) = line.find(prefix).map(|i| &line[i + prefix.len()..]) else {
                continue;
            };
            let guest_seconds = rest
                .split_whitespace()
                .next()
                .and_then(|s| s.parse::<f64>().ok());
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if !seen.iter().any(|m| m.name == name) {
                seen.push(Milestone {
                    name,
                    at: self.start.elapsed(),
                    guest_seconds,
                });
            }
        }
        self.line.clear();
    }
}

impl<W: Write> Write for ConsoleMilestones<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        for &byte in &buf[..n] {
            if byte == b'\n' {
                self.end_of_line();
            } else if self.line.len() < LINE_CAP {
                self.line.push(byte);
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Sum of `Rss:` over every mapping in `smaps` whose start address is not in `excluded`.
pub fn rss_excluding(smaps: &str, excluded: &[u64]) -> u64 {
    let mut total = 0;
    let mut skip = false;
    for line in smaps.lines() {
        if let Some(range) = line.split_whitespace().next().filter(|w| w.contains('-')) {
            if let Some(Ok(start)) = range.split('-').next().map(|s| u64::from_str_radix(s, 16)) {
                skip = excluded.contains(&start);
                continue;
            }
        }
        if let Some(kib) = line.strip_prefix("Rss:") {
            if !skip {
                total += kib
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// This process's RSS in KiB, without the mappings starting at `guest_regions`.
pub fn vmm_rss_kib(guest_regions: &[u64]) -> io::Result<u64> {
    Ok(rss_excluding(
        &std::fs::read_to_string("/proc/self/smaps")?,
        guest_regions,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_mappings_are_left_out() {
        let smaps = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0\n\
Size:               1024 kB\n\
Rss:                 512 kB\n\
55d000000000-55d000001000 r-xp 00000000 08:01 42 /usr/bin/kindling-vmm\n\
Rss:                   4 kB\n\
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n\
Rss:                  12 kB\n";
        assert_eq!(rss_excluding(smaps, &[]), 528);
        assert_eq!(rss_excluding(smaps, &[0x7f00_0000_0000]), 16);
        let own = vmm_rss_kib(&[]).unwrap();
        assert!(own > 100, "a live process has some RSS: {own}");
    }

    #[test]
    fn console_milestones_are_noted_once_and_passed_on() {
        let seen = Milestones::default();
        let start = Instant::now();
        let mut sink = ConsoleMilestones::new(Vec::new(), start, seen.clone());
        let text = "[    0.1] Linux version\ninit: userspace at 1.250 s\ninit: users";
        sink.write_all(text.as_bytes()).unwrap();
        assert_eq!(seen.lock().unwrap().len(), 1);
        sink.write_all(b"pace at 9.000 s\ninit: bootstrap started at 2.5 s (pid 7)\n")
            .unwrap();
        let seen = seen.lock().unwrap().clone();
        let guest: Vec<_> = seen.iter().map(|m| (m.name, m.guest_seconds)).collect();
        assert_eq!(
            guest,
            [("userspace", Some(1.25)), ("bootstrap_started", Some(2.5))]
        );
        assert!(seen[0].at <= seen[1].at && seen[1].at <= start.elapsed());
        assert!(sink.inner.starts_with(text.as_bytes()));
    }

    #[test]
    fn a_long_line_is_cut_not_kept() {
        let seen = Milestones::default();
        let mut sink = ConsoleMilestones::new(io::sink(), Instant::now(), seen.clone());
        sink.write_all(&vec![b'x'; 1 << 20]).unwrap();
        assert_eq!(sink.line.len(), LINE_CAP);
        sink.write_all(b"\ninit: userspace at 0.5 s\n").unwrap();
        assert_eq!(seen.lock().unwrap()[0].guest_seconds, Some(0.5));
    }
}
