//! A guest's console log: written through [`capture`], which caps it (a guest that prints
//! forever must not fill the host's disk), and read for init's boot milestones and the tail
//! shown on failure.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

/// How much of a guest's console one environment keeps. A kernel's boot and init's
/// milestones take a few KB; function logs go over vsock, not the console.
pub const LOG_CAP: u64 = 1 << 20;

/// The line that ends a console log that reached [`LOG_CAP`].
pub const CAPPED: &str =
    "\n[kindling: console log capped at 1 MiB; the rest of this guest's console is dropped]\n";

/// A pipe for a hypervisor's console output: the write end, returned, becomes its stdout
/// (its stderr too, where its messages belong beside the console); a task copies the read
/// end into `log` (appending), up to `cap` bytes, then the [`CAPPED`] line. Past the cap it
/// goes on reading and dropping, so that the hypervisor never blocks on its console. The
/// task ends when every copy of the write end is closed (the hypervisor has exited).
pub fn capture(log: &Path, cap: u64) -> io::Result<(OwnedFd, Capture)> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let (write, read) = pipe::pipe()?;
    let task = tokio::spawn(copy_capped(read, tokio::fs::File::from_std(file), cap));
    Ok((write.into_blocking_fd()?, Capture(Some(task))))
}

/// The copy of one hypervisor's console into its log.
#[derive(Debug)]
pub struct Capture(Option<JoinHandle<()>>);

impl Capture {
    /// Waits until the copy has written the hypervisor's last output (call it once the
    /// hypervisor has exited), so that the log is whole when it is read for `kindling logs`;
    /// a moment at most, in case a helper still holds the pipe.
    pub async fn finish(&mut self) {
        if let Some(task) = self.0.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }
}

async fn copy_capped(mut from: pipe::Receiver, mut to: tokio::fs::File, cap: u64) {
    let mut left = cap;
    let mut buf = vec![0; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if left == 0 {
            continue;
        }
        let keep = usize::try_from(left).map_or(n, |left| left.min(n));
        left -= keep as u64;
        let mut written = to.write_all(&buf[..keep]).await;
        if left == 0 && written.is_ok() {
            written = to.write_all(CAPPED.as_bytes()).await;
        }
        // Flushed at once: the host reads the log while the guest runs.
        if written.and(to.flush().await).is_err() {
            left = 0;
        }
    }
}

/// `init: userspace at 0.412 s` — seconds from kernel start to init, as init prints it.
pub fn userspace_at(console: &str) -> Option<f64> {
    milestone(console, "init: userspace at ")
}

/// `init: bootstrap started at 0.530 s`.
pub fn bootstrap_started_at(console: &str) -> Option<f64> {
    milestone(console, "init: bootstrap started at ")
}

fn milestone(console: &str, prefix: &str) -> Option<f64> {
    console.lines().find_map(|line| {
        let rest = &line[line.find(prefix)? + prefix.len()..];
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The last `lines` lines of a console log, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::process::Command;

    /// A process that floods its console (`yes`, as a guest printing forever would through
    /// the VMM's serial): the log stops at the cap with the marker line, and the writer is
    /// never blocked — it goes on writing far past the cap.
    #[tokio::test]
    async fn a_flooding_console_is_capped_and_never_blocks_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let cap = 64 << 10;
        let (console, _copy) = capture(&log, cap).unwrap();
        let mut flood = Command::new("yes")
            .arg("guest says hello")
            .stdout(console)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = flood.id().unwrap();
        let wrote = || {
            let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
            io.lines()
                .find_map(|l| l.strip_prefix("wchar: "))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while wrote() < 100 * cap {
            assert!(
                Instant::now() < deadline,
                "the writer blocked at {} bytes",
                wrote()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        flood.kill().await.unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.len() as u64, cap + CAPPED.len() as u64);
        assert!(text.starts_with("guest says hello\n"));
        assert!(text.ends_with(CAPPED), "{}", &text[text.len() - 200..]);
    }

    #[test]
    fn milestones_are_found_among_kernel_lines() {
        let log = "[    0.000000] Linux version 6.1\r\ninit: userspace at 0.412 s\r\n\
                   init: mounted /proc\ninit: bootstrap started at 0.530 s\n";
        assert_eq!(userspace_at(log), Some(0.412));
        assert_eq!(bootstrap_started_at(log), Some(0.530));
        assert_eq!(userspace_at("init: userspace at soon"), None);
        assert_eq!(bootstrap_started_at(""), None);
    }
}
