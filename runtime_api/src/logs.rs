//! Function logs: what a function's runtime printed, framed per invocation by the
//! `START` / `END` / `REPORT` lines Lambda users know.
//!
//! Every line goes to an append-only file per function (`<state>/logs/<name>.log`, for
//! `kindling logs` and post-mortems) and to a broadcast channel (for `kindling run`,
//! which prints lines as they happen). Each invocation also keeps the end of its own log
//! ([`LogTail`]) so that the caller can ask for its tail (`X-Amz-Log-Type: Tail`).
//!
//! What the host holds stays bounded whatever a function prints: an invocation keeps at
//! most `2 × TAIL_BYTES` of its log in memory, a live line is cut at [`LIVE_LINE_BYTES`]
//! for subscribers (the file has it whole), and a function's file is rotated once it
//! passes its cap ([`DEFAULT_MAX_FILE_BYTES`]): `<name>.log` becomes `<name>.log.1`
//! (replacing the previous one), so a function never takes more than twice the cap of
//! disk.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use kindling_wire::InvocationReport;
use tokio::sync::broadcast;

/// How much of an invocation's log a caller gets back with `X-Amz-Log-Type: Tail`.
pub const TAIL_BYTES: usize = 4096;
/// A function's log file is rotated when a line would take it past this (64 MiB).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 << 20;
/// Longest line subscribers get (the rest is in the file): with the channel's 4096
/// lines, a subscriber that lags holds at most 32 MiB.
pub const LIVE_LINE_BYTES: usize = 8 << 10;
/// Lines the live channel holds for a subscriber that lags.
const LIVE_LINES: usize = 4096;

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
    files: Mutex<HashMap<String, OpenLog>>,
    max_file_bytes: u64,
}

/// A function's open log file and how long it is.
#[derive(Debug)]
struct OpenLog {
    file: File,
    len: u64,
}

impl LogSink {
    /// Creates `dir` if needed; files are opened lazily, one per function, and rotated
    /// at [`DEFAULT_MAX_FILE_BYTES`] (see [`LogSink::with_max_file_bytes`]).
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (tx, _) = broadcast::channel(LIVE_LINES);
        Ok(Self {
            dir: dir.to_path_buf(),
            tx,
            files: Mutex::default(),
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        })
    }

    /// Rotates each function's file when a line would take it past `max` bytes (a
    /// single longer line still goes whole into a fresh file).
    #[must_use]
    pub fn with_max_file_bytes(mut self, max: u64) -> Self {
        self.max_file_bytes = max.max(1);
        self
    }

    /// Live lines of every function from now on, each cut at [`LIVE_LINE_BYTES`]. A
    /// subscriber that falls behind by more than 4096 lines misses some (they stay in
    /// the files).
    pub fn subscribe(&self) -> broadcast::Receiver<LogLine> {
        self.tx.subscribe()
    }

    /// The log file of `function` that lines are appended to.
    pub fn path(&self, function: &str) -> PathBuf {
        self.dir.join(format!("{function}.log"))
    }

    /// Where the lines before the last rotation of `function`'s log are: `<name>.log.1`.
    pub fn rotated_path(&self, function: &str) -> PathBuf {
        self.dir.join(format!("{function}.log.1"))
    }

    /// Appends one line (a trailing newline, if any, is dropped).
    pub fn write(&self, function: &str, line: &str) {
        self.write_lines(function, &[line]);
    }

    /// Appends lines that belong together (an invocation's `END` and `REPORT`) in one
    /// write, and hands them to subscribers back to back, so that a subscriber woken by
    /// the first finds the others too.
    pub fn write_lines(&self, function: &str, lines: &[&str]) {
        let lines: Vec<&str> = lines
            .iter()
            .map(|line| line.strip_suffix('\n').unwrap_or(line))
            .collect();
        self.append(function, &lines);
        for line in lines {
            // No subscriber is fine: the file has the line.
            let _ = self.tx.send(LogLine {
                function: function.to_string(),
                text: live_text(line),
            });
        }
    }

    fn append(&self, function: &str, lines: &[&str]) {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let log = match files.get_mut(function) {
            Some(log) => log,
            None => match self.open(function) {
                Ok(log) => files.entry(function.to_string()).or_insert(log),
                Err(e) => {
                    tracing::warn!(function, error = %e, "cannot open the function log");
                    return;
                }
            },
        };
        // One write for all: `writeln!` on a `File` makes a syscall per piece.
        let mut whole = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for line in lines {
            whole.extend_from_slice(line.as_bytes());
            whole.push(b'\n');
        }
        let bytes = u64::try_from(whole.len()).unwrap_or(u64::MAX);
        if log.len > 0 && log.len.saturating_add(bytes) > self.max_file_bytes {
            if let Err(e) = self.rotate(function, log) {
                tracing::warn!(function, error = %e, "cannot rotate the function log");
            }
        }
        match log.file.write_all(&whole) {
            Ok(()) => log.len = log.len.saturating_add(bytes),
            Err(e) => tracing::warn!(function, error = %e, "cannot write the function log"),
        }
    }

    fn open(&self, function: &str) -> io::Result<OpenLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(function))?;
        let len = file.metadata()?.len();
        Ok(OpenLog { file, len })
    }

    /// `<name>.log` becomes `<name>.log.1` and a new `<name>.log` starts. Should the
    /// rename fail, the file is emptied instead: the disk stays bounded either way.
    fn rotate(&self, function: &str, log: &mut OpenLog) -> io::Result<()> {
        if let Err(e) = std::fs::rename(self.path(function), self.rotated_path(function)) {
            log.file.set_len(0)?;
            log.len = 0;
            return Err(e);
        }
        // Should this fail, lines go on to the renamed file until the next rotation
        // (whose rename then fails, and empties it).
        *log = self.open(function)?;
        Ok(())
    }
}

/// `line`, cut at [`LIVE_LINE_BYTES`] (on a character boundary) with a note of how much
/// only the file has.
fn live_text(line: &str) -> String {
    if line.len() <= LIVE_LINE_BYTES {
        return line.to_string();
    }
    let cut = floor_char_boundary(line, LIVE_LINE_BYTES);
    format!(
        "{} [... {} more bytes in the log file]",
        &line[..cut],
        line.len() - cut
    )
}

/// The largest character boundary of `s` at or below `i`.
fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The end of one invocation's log, what the host keeps of it in memory: all of it while
/// it is short, else at least its last [`TAIL_BYTES`] and at most twice that, so that
/// [`tail`] of the framed log (`START` … `REPORT`) is the same as if all of it had been
/// kept, however much the function prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogTail {
    text: String,
    /// Bytes of the log no longer held.
    dropped: u64,
}

impl LogTail {
    /// Appends one line and a newline, forgetting the front past the bound.
    pub fn push_line(&mut self, line: &str) {
        const KEEP: usize = 2 * TAIL_BYTES;
        let mut line = line;
        if line.len() >= KEEP {
            // Only its end can reach the tail: the rest of it and everything before goes.
            let cut = floor_char_boundary(line, line.len() - TAIL_BYTES);
            self.forget(self.text.len() + cut);
            self.text.clear();
            line = &line[cut..];
        }
        self.text.push_str(line);
        self.text.push('\n');
        if self.text.len() > KEEP {
            let cut = floor_char_boundary(&self.text, self.text.len() - TAIL_BYTES);
            self.forget(cut);
            self.text.drain(..cut);
        }
    }

    fn forget(&mut self, bytes: usize) {
        self.dropped = self
            .dropped
            .saturating_add(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    /// What is kept, whole lines unless the front was dropped.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// How many bytes of the log were dropped from the front.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn into_string(self) -> String {
        self.text
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

/// A cold start restored from a snapshot (SnapStart), as Lambda reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restore {
    /// The environment's start → its runtime's first `/next` on the host: restoring the
    /// snapshot outside the VM, and the guest resuming and asking for its event.
    pub duration: Duration,
    /// The part inside the VM (resumed → first `/next`): what Lambda bills, not the
    /// restore of the snapshot itself.
    pub billed: Duration,
}

/// Milliseconds rounded up to a whole number, at least 1: Lambda's billing.
fn billed_ms(ms: f64) -> u64 {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a whole, non-negative number of ms by then; `as` saturates a float past u64::MAX"
    )]
    let billed = ms.max(0.0).ceil().max(1.0) as u64;
    billed
}

/// How an invocation ended, as the end of its `REPORT` line tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status<'a> {
    /// A response, or a function error the runtime reported: no `Status` field.
    Answered,
    /// The function's (or its init's) time ran out: `Status: timeout`.
    Timeout,
    /// The environment failed the invocation (the runtime exited, ran out of memory, could
    /// not start, answered too much): `Status: error` and `Error Type: <type>`.
    Error(&'a str),
}

/// The `REPORT` line. Billed duration is the duration rounded up to the next whole
/// millisecond; `Init Duration` appears on the first invocation of a booted environment,
/// `Restore Duration` and `Billed Restore Duration` on that of a restored one (SnapStart),
/// then that environment's own start phases (Kindling's addition); last, as in Lambda's,
/// the [`Status`] of a failed invocation.
pub fn report_line(
    request_id: &str,
    memory_mb: u32,
    report: &InvocationReport,
    restore: Option<Restore>,
    status: Status<'_>,
    phases: &[(&'static str, Duration)],
) -> String {
    let mut line = format!(
        "REPORT RequestId: {request_id}\tDuration: {:.2} ms\tBilled Duration: {} ms\tMemory Size: {memory_mb} MB\tMax Memory Used: {} MB",
        report.duration_ms,
        billed_ms(report.duration_ms),
        report.max_memory_used_mb
    );
    if let Some(init) = report.init_duration_ms {
        line.push_str(&format!("\tInit Duration: {init:.2} ms"));
    }
    if let Some(restore) = restore {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        line.push_str(&format!(
            "\tRestore Duration: {:.2} ms\tBilled Restore Duration: {} ms",
            ms(restore.duration),
            billed_ms(ms(restore.billed))
        ));
    }
    for (name, took) in phases {
        line.push_str(&format!("\t{name}: {:.2} ms", took.as_secs_f64() * 1000.0));
    }
    match status {
        Status::Answered => {}
        Status::Timeout => line.push_str("\tStatus: timeout"),
        Status::Error(error_type) => {
            line.push_str(&format!("\tStatus: error\tError Type: {error_type}"));
        }
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
            ..Default::default()
        };
        assert_eq!(
            report_line("id1", 128, &r, None, Status::Answered, &[]),
            "REPORT RequestId: id1\tDuration: 1.23 ms\tBilled Duration: 2 ms\tMemory Size: 128 MB\tMax Memory Used: 20 MB\tInit Duration: 45.67 ms"
        );
        let phases = [("Guest Boot", Duration::from_micros(729_004))];
        assert!(report_line("id1", 128, &r, None, Status::Answered, &phases)
            .ends_with("\tInit Duration: 45.67 ms\tGuest Boot: 729.00 ms"));
        let warm = InvocationReport {
            duration_ms: 3.0,
            init_duration_ms: None,
            max_memory_used_mb: 7,
            ..Default::default()
        };
        assert!(report_line("id2", 256, &warm, None, Status::Answered, &[])
            .ends_with("Billed Duration: 3 ms\tMemory Size: 256 MB\tMax Memory Used: 7 MB"));
        let restore = Restore {
            duration: Duration::from_micros(280_812),
            billed: Duration::from_micros(177_200),
        };
        assert!(report_line("id3", 128, &warm, Some(restore), Status::Answered, &[])
            .ends_with("Max Memory Used: 7 MB\tRestore Duration: 280.81 ms\tBilled Restore Duration: 178 ms"));
    }

    #[test]
    fn a_failed_invocation_reports_its_status_like_lambda() {
        let r = InvocationReport {
            duration_ms: 3000.0,
            init_duration_ms: Some(402.04),
            max_memory_used_mb: 73,
            ..Default::default()
        };
        assert_eq!(
            report_line("id1", 128, &r, None, Status::Timeout, &[]),
            "REPORT RequestId: id1\tDuration: 3000.00 ms\tBilled Duration: 3000 ms\tMemory Size: 128 MB\tMax Memory Used: 73 MB\tInit Duration: 402.04 ms\tStatus: timeout"
        );
        let phases = [("Guest Boot", Duration::from_millis(5))];
        assert!(
            report_line("id2", 1024, &r, None, Status::Error("Runtime.OutOfMemory"), &phases)
                .ends_with("\tInit Duration: 402.04 ms\tGuest Boot: 5.00 ms\tStatus: error\tError Type: Runtime.OutOfMemory")
        );
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
    fn a_log_tail_is_bounded_and_tails_like_the_whole_log() {
        // Lines of every length, some multi-byte, some longer than the window.
        let mut lines = Vec::new();
        for i in 0..3000usize {
            let width = match i % 7 {
                0 => 1,
                1 => 80,
                2 => 4095,
                3 => 9000,
                _ => i % 300,
            };
            let fill = if i % 3 == 0 { "é" } else { "x" };
            lines.push(format!("{i}:{}", fill.repeat(width)));
        }
        let mut whole = String::new();
        let mut kept = LogTail::default();
        for (n, line) in lines.iter().enumerate() {
            whole.push_str(line);
            whole.push('\n');
            kept.push_line(line);
            assert!(kept.as_str().len() <= 2 * TAIL_BYTES + 1, "after line {n}");
            assert!(whole.ends_with(kept.as_str()));
            assert_eq!(
                u64::try_from(whole.len() - kept.as_str().len()).unwrap(),
                kept.dropped()
            );
            if n % 50 == 0 || n + 1 == lines.len() {
                let frame = |log: &str| format!("START RequestId: r\n{log}END RequestId: r\n");
                assert_eq!(
                    tail(&frame(kept.as_str())),
                    tail(&frame(&whole)),
                    "after line {n}"
                );
            }
        }
        let mut short = LogTail::default();
        short.push_line("one");
        short.push_line("two");
        assert_eq!((short.as_str(), short.dropped()), ("one\ntwo\n", 0));
    }

    #[test]
    fn files_rotate_once_past_their_cap() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LogSink::new(dir.path()).unwrap().with_max_file_bytes(100);
        for i in 0..30 {
            sink.write("f", &format!("line {i:02} ........."));
        }
        let current = std::fs::read_to_string(sink.path("f")).unwrap();
        let previous = std::fs::read_to_string(sink.rotated_path("f")).unwrap();
        assert!(current.len() <= 100 && previous.len() <= 100);
        assert!(current.ends_with("line 29 .........\n"), "{current}");
        // One old file, and the two together are the most recent lines in order.
        let both = format!("{previous}{current}");
        let first: usize = both[5..7].parse().unwrap();
        let want: String = (first..30)
            .map(|i| format!("line {i:02} .........\n"))
            .collect();
        assert_eq!(both, want);
        // A single line past the cap still goes whole, into a file of its own.
        let long = "y".repeat(250);
        sink.write("f", &long);
        assert_eq!(
            std::fs::read_to_string(sink.path("f")).unwrap(),
            format!("{long}\n")
        );
    }

    #[test]
    fn long_lines_are_cut_for_subscribers_only() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LogSink::new(dir.path()).unwrap();
        let mut rx = sink.subscribe();
        let long = "é".repeat(LIVE_LINE_BYTES);
        sink.write("f", &long);
        let live = rx.try_recv().unwrap().text;
        assert!(live.len() < LIVE_LINE_BYTES + 64, "{}", live.len());
        assert!(live.ends_with(&format!(
            "[... {} more bytes in the log file]",
            long.len() - LIVE_LINE_BYTES
        )));
        assert_eq!(
            std::fs::read_to_string(sink.path("f")).unwrap(),
            format!("{long}\n")
        );
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
