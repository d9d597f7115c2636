//! The clock of a guest under QEMU TCG.
//!
//! Under TCG the guest's TSC is the host's counter (QEMU's `rdtsc` reads it), so it runs at
//! the host's rate. But Linux cannot trust it in QEMU's `microvm` machine, which has no
//! HPET and no ACPI PM timer: under emulation the PIT calibration fails more often than
//! not, and where it passes, the clocksource watchdog soon finds the TSC at odds with
//! jiffies (ticks get lost). The kernel marks the TSC unstable and keeps time with
//! jiffies: a clock that moves
//! in 4 ms steps (HZ=250), no high-resolution timers (every sleep and timeout rounds up to
//! a tick), and every clock read a system call, as the vDSO cannot read jiffies; a
//! REPORT's Duration, which the agent measures on that clock, came out in whole ticks
//! (4.00 or 8.00 ms for a no-op).
//! `tsc_early_khz` hands the kernel the rate, measured here, and `tsc=reliable` turns off
//! the watchdog that would have no reference clock to check it against. Only for a host
//! whose TSC keeps one rate through frequency changes and idle states; elsewhere the guest
//! stays on jiffies, as it would without these words.

use std::time::{Duration, Instant};

/// How long the rate is measured: the counter and the clock are each read to within tens
/// of nanoseconds, so the rate is off by a few parts per million, well within what the
/// agent's clock steps (it sets the guest's clock from each event) absorb.
const MEASURE_FOR: Duration = Duration::from_millis(20);
/// Reads of the counter around one of the clock, of which the tightest pair is kept (one
/// may straddle a preemption).
const TRIES: usize = 8;

/// The guest kernel arguments that put a TCG guest on the TSC, for this host; `None` when
/// its TSC does not keep a constant rate.
pub fn tcg_kernel_args() -> Option<String> {
    host_tsc_is_constant().then(|| kernel_args(measure_tsc_khz()))
}

/// Whether this host's TSC keeps one rate (see [`has_constant_tsc`]): where it does not, a
/// TCG guest stays on jiffies.
pub fn host_tsc_is_constant() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|cpuinfo| has_constant_tsc(&cpuinfo))
}

fn kernel_args(tsc_khz: u64) -> String {
    format!("tsc_early_khz={tsc_khz} tsc=reliable")
}

/// Whether the first CPU's flags say its TSC ticks at one rate whatever the CPU's
/// frequency (`constant_tsc`) and in every idle state (`nonstop_tsc`).
fn has_constant_tsc(cpuinfo: &str) -> bool {
    let Some(flags) = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("flags").map(|rest| rest.trim_start()))
        .and_then(|rest| rest.strip_prefix(':'))
    else {
        return false;
    };
    let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
    has("constant_tsc") && has("nonstop_tsc")
}

/// The host's TSC rate in kHz: counter ticks over [`MEASURE_FOR`] of the monotonic clock.
fn measure_tsc_khz() -> u64 {
    let (tsc0, t0) = tsc_at_instant();
    std::thread::sleep(MEASURE_FOR);
    let (tsc1, t1) = tsc_at_instant();
    let nanos = t1.duration_since(t0).as_nanos().max(1);
    let khz = u128::from(tsc1.wrapping_sub(tsc0)) * 1_000_000 / nanos;
    u64::try_from(khz).unwrap_or(u64::MAX)
}

/// The counter and the clock read together: the clock between two reads of the counter,
/// the counter taken as their midpoint, from the tightest of [`TRIES`] such brackets.
fn tsc_at_instant() -> (u64, Instant) {
    (0..TRIES)
        .map(|_| {
            let before = rdtsc();
            let now = Instant::now();
            let width = rdtsc().wrapping_sub(before);
            (width, before.wrapping_add(width / 2), now)
        })
        .min_by_key(|&(width, _, _)| width)
        .map(|(_, tsc, now)| (tsc, now))
        .unwrap_or_else(|| (rdtsc(), Instant::now()))
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter, which every x86-64 CPU has; it
    // touches no memory. (Linux lets user space run it unless a process asks otherwise
    // with PR_SET_TSC, which this server never does.)
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_tsc_needs_both_flags_of_the_first_cpu() {
        let cpuinfo = |flags: &str| {
            format!("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu {flags} sse2\n\nprocessor\t: 1\nflags\t\t: constant_tsc nonstop_tsc\n")
        };
        assert!(has_constant_tsc(&cpuinfo("tsc constant_tsc nonstop_tsc")));
        assert!(!has_constant_tsc(&cpuinfo("tsc constant_tsc")));
        assert!(!has_constant_tsc(&cpuinfo("tsc nonstop_tsc")));
        assert!(!has_constant_tsc(&cpuinfo("tsc nonstop_tsc_s3")));
        assert!(!has_constant_tsc("processor\t: 0\n"));
    }

    #[test]
    fn the_rate_is_measured_in_khz() {
        // Every x86-64 CPU of this century counts at hundreds of MHz to a few GHz.
        let khz = measure_tsc_khz();
        assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
        assert_eq!(kernel_args(2_445_430), "tsc_early_khz=2445430 tsc=reliable");
    }
}
