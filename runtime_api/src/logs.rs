//! Function logs: what a function's runtime printed, framed per invocation by the
//! `START` / `END` / `REPORT` lines Lambda users know.
//!
//! Every line goes to an append-only file per function (`<state>/logs/<name>.log`, for
//! `kindling logs` and post-mortems) and to a broadcast channel (for `kindling run`,
//! which prints lines as they happen). Each invocation also keeps its own copy so that
//! the caller can ask for its tail (`X-Amz-Log-Type: Tail`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use kindling_wire::InvocationReport;
use tokio::sync::broadcast;

/// How much of an invocation's log a caller gets back with `X-Amz-Log-Type: Tail`.
pub const TAIL_BYTES: usize = 4096;

/// One line of one function's log, as subscribers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub function: String,
    /// The line without its trailing newline.
    pub text: String,
}

/// Where the log lines of every function go.
#[derive(Debug)]
pub struct LogSink {
    dir: PathBuf,
    tx: broadcast::Sender<LogLine>,
    files: Mutex<std::collections::HashMap<String, File>>,
}

impl LogSink {
    /// Creates `dir` if needed; files are opened lazily, one per function.
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (tx, _) = broadcast::channel(4096);
        Ok(Self {
            dir: dir.to_path_buf(),
            tx,
            files: Mutex::default(),
        })
    }

    /// Live lines of every function from now on. A subscriber that falls behind by more
    /// than 4096 lines misses some (they stay in the files).
    pub fn subscribe(&self) -> broadcast::Receiver<LogLine> {
        self.tx.subscribe()
    }

    /// The append-only log file of `function`.
    pub fn path(&self, function: &str) -> PathBuf {
        self.dir.join(format!("{function}.log"))
    }

    /// Appends one line (a trailing newline, if any, is dropped).
    pub fn write(&self, function: &str, line: &str) {
        let line = line.strip_suffix('\n').unwrap_or(line);
        {
            let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
            let file = match files.get_mut(function) {
                Some(f) => Some(f),
                None => match OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.path(function))
                {
                    Ok(f) => Some(files.entry(function.to_string()).or_insert(f)),
                    Err(e) => {
                        tracing::warn!(function, error = %e, "cannot open the function log");
                        None
                    }
                },
            };
            if let Some(file) = file {
                if let Err(e) = writeln!(file, "{line}") {
                    tracing::warn!(function, error = %e, "cannot write the function log");
                }
            }
        }
        // No subscriber is fine: the file has the line.
        let _ = self.tx.send(LogLine {
            function: function.to_string(),
            text: line.to_string(),
        });
    }
}

/// `START RequestId: <id> Version: $LATEST`
pub fn start_line(request_id: &str, version: &str) -> String {
    format!("START RequestId: {request_id} Version: {version}")
}

/// `END RequestId: <id>`
pub fn end_line(request_id: &str) -> String {
    format!("END RequestId: {request_id}")
}

/// The `REPORT` line. Billed duration is the duration rounded up to the next whole
/// millisecond; `Init Duration` appears on the first invocation of an environment,
/// followed by that environment's own start phases (Kindling's addition).
pub fn report_line(
    request_id: &str,
    memory_mb: u32,
    report: &InvocationReport,
    phases: &[(&'static str, Duration)],
) -> String {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a whole, non-negative number of ms by then; `as` saturates a float past u64::MAX"
    )]
    let billed = report.duration_ms.max(0.0).ceil().max(1.0) as u64;
    let mut line = format!(
        "REPORT RequestId: {request_id}\tDuration: {:.2} ms\tBilled Duration: {billed} ms\tMemory Size: {memory_mb} MB\tMax Memory Used: {} MB",
        report.duration_ms, report.max_memory_used_mb
    );
    if let Some(init) = report.init_duration_ms {
        line.push_str(&format!("\tInit Duration: {init:.2} ms"));
    }
    for (name, took) in phases {
        line.push_str(&format!("\t{name}: {:.2} ms", took.as_secs_f64() * 1000.0));
    }
    line
}

/// The last [`TAIL_BYTES`] of an invocation's log, cut at a line start when possible so
/// that the caller never sees half a line (unless one line alone is longer).
pub fn tail(log: &str) -> &str {
    if log.len() <= TAIL_BYTES {
        return log;
    }
    let mut cut = log.len() - TAIL_BYTES;
    while !log.is_char_boundary(cut) {
        cut += 1;
    }
    match log[cut..].find('\n') {
        Some(nl) if cut + nl + 1 < log.len() => &log[cut + nl + 1..],
        _ => &log[cut..],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_reads_like_lambda() {
        let r = InvocationReport {
            duration_ms: 1.234,
            init_duration_ms: Some(45.671),
            max_memory_used_mb: 20,
        };
        assert_eq!(
            report_line("id1", 128, &r, &[]),
            "REPORT RequestId: id1\tDuration: 1.23 ms\tBilled Duration: 2 ms\tMemory Size: 128 MB\tMax Memory Used: 20 MB\tInit Duration: 45.67 ms"
        );
        let phases = [("Guest Boot", Duration::from_micros(729_004))];
        assert!(report_line("id1", 128, &r, &phases)
            .ends_with("\tInit Duration: 45.67 ms\tGuest Boot: 729.00 ms"));
        let warm = InvocationReport {
            duration_ms: 3.0,
            init_duration_ms: None,
            max_memory_used_mb: 7,
        };
        assert!(report_line("id2", 256, &warm, &[])
            .ends_with("Billed Duration: 3 ms\tMemory Size: 256 MB\tMax Memory Used: 7 MB"));
    }

    #[test]
    fn tail_keeps_whole_lines_of_the_end() {
        let log: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        let t = tail(&log);
        assert!(t.len() <= TAIL_BYTES);
        assert!(t.starts_with("line "), "{}", &t[..20]);
        assert!(t.ends_with("line 999\n"));
        assert_eq!(tail("short\n"), "short\n");
    }

    #[test]
    fn lines_reach_file_and_subscribers() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LogSink::new(dir.path()).unwrap();
        let mut rx = sink.subscribe();
        sink.write("f", "hello\n");
        sink.write("f", "world");
        assert_eq!(
            std::fs::read_to_string(sink.path("f")).unwrap(),
            "hello\nworld\n"
        );
        assert_eq!(rx.try_recv().unwrap().text, "hello");
        assert_eq!(rx.try_recv().unwrap().function, "f");
    }
}
