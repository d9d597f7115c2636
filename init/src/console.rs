//! The console: where init's own lines and the bootstrap's output go.
//!
//! Every line init writes starts with `init: `; the hypervisor backends parse
//! `init: userspace at S.SSS s` and `init: bootstrap started at S.SSS s` to measure boot.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{Context, Result};
use nix::time::{clock_gettime, ClockId};

/// Writes one `init: `-prefixed line to stderr, which is the console once
/// [`attach`] has run (and the kernel's initial console before that).
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("init: {}", format_args!($($arg)*))
    };
}
pub(crate) use say;

/// Seconds since the kernel started: `CLOCK_BOOTTIME`, the clock behind `/proc/uptime`,
/// read without needing `/proc` to be mounted yet.
pub fn uptime() -> f64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
        .unwrap_or(0.0)
}

/// Points init's stdout and stderr (and so the bootstrap's, which inherits them) at
/// `path`. An empty path keeps what init was started with (the sandbox's log pipe).
pub fn attach(path: &str) -> Result<()> {
    if path.is_empty() {
        return Ok(());
    }
    let console = OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("open console {path}"))?;
    nix::unistd::dup2_stdout(&console).with_context(|| format!("dup2 console {path}"))?;
    nix::unistd::dup2_stderr(&console).with_context(|| format!("dup2 console {path}"))?;
    Ok(())
}
