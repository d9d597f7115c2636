//! The function log: the runtime's stdout and stderr (and the extensions'), captured line
//! by line, offered to the Telemetry API's subscribers and posted to the host in batches, each batch tagged with the request id in flight when its lines
//! were read.
//!
//! Lines a runtime wrote before it posted its result are already in the pipe when the
//! result arrives, so [`LogSink::finish_invocation`] drains the pipes without blocking and
//! ships everything before the invocation's report: no line of an invocation ever arrives
//! after its report.
//!
//! The pipes are always read, so a runtime never blocks on its output, however slowly
//! the host takes it; what waits to be posted is bounded instead ([`MAX_PENDING`], inside
//! the function's own memory): past it lines are dropped, and one [`marker`] line in
//! their place says how many bytes were lost.

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use kindling_wire::{HEADER_REQUEST_ID, PATH_LOGS};
use tokio::net::unix::pipe;
use tokio::sync::Notify;

use crate::telemetry::{Category, Telemetry};
use crate::upstream::Upstream;

/// A line longer than this is cut and shipped in pieces, so a runtime that never writes
/// a newline cannot grow the bootstrap without bound.
const MAX_LINE: usize = 256 * 1024;
/// Largest batch posted at once.
const MAX_BATCH: usize = 256 * 1024;
/// How long the shipper waits for more lines before posting a batch.
const BATCH_DELAY: Duration = Duration::from_millis(5);
/// Bytes of lines waiting to be posted past which new lines are dropped (the batches
/// being posted, at most as much again, come on top).
pub const MAX_PENDING: usize = 1 << 20;

/// The line that stands for `bytes` of the runtime's output that were dropped.
pub fn marker(bytes: u64) -> String {
    format!(
        "[kindling] {bytes} bytes of log dropped: the function logged faster than the host took them\n"
    )
}

struct Batch {
    request_id: Option<String>,
    text: Vec<u8>,
}

struct Source {
    rx: Arc<pipe::Receiver>,
    partial: Vec<u8>,
    /// Whose output it is, for telemetry.
    category: Category,
}

#[derive(Default)]
struct State {
    sources: Vec<Source>,
    batches: VecDeque<Batch>,
    /// Bytes in `batches`.
    pending: usize,
    /// Bytes dropped since the last marker.
    dropped: u64,
    request_id: Option<String>,
}

impl State {
    /// Queues one line (a newline is added if it has none), or drops it when
    /// [`MAX_PENDING`] bytes already wait; the first line queued after a drop comes after
    /// the marker that accounts for it.
    fn push_line(&mut self, line: &[u8]) {
        let len = line.len() + usize::from(!line.ends_with(b"\n"));
        if self.pending.saturating_add(len) > MAX_PENDING {
            self.dropped = self
                .dropped
                .saturating_add(u64::try_from(len).unwrap_or(u64::MAX));
            return;
        }
        self.mark_dropped();
        self.queue(line);
    }

    /// Queues the marker of the lines dropped since the last one, if any (it may take
    /// the pending bytes a line past the bound).
    fn mark_dropped(&mut self) {
        if self.dropped > 0 {
            let marker = marker(mem::take(&mut self.dropped));
            self.queue(marker.as_bytes());
        }
    }

    fn queue(&mut self, line: &[u8]) {
        let len = line.len() + usize::from(!line.ends_with(b"\n"));
        self.pending += len;
        match self.batches.back_mut() {
            Some(b)
                if b.request_id == self.request_id && b.text.len() + line.len() <= MAX_BATCH =>
            {
                b.text.extend_from_slice(line)
            }
            _ => self.batches.push_back(Batch {
                request_id: self.request_id.clone(),
                text: line.to_vec(),
            }),
        }
        if !line.ends_with(b"\n") {
            self.batches
                .back_mut()
                .expect("just pushed")
                .text
                .push(b'\n');
        }
    }

    /// Reads whatever the pipes hold right now, without waiting, offering each line to
    /// `tap`. A source at end of file gives its last partial line and is dropped.
    fn drain(&mut self, tap: &Telemetry) {
        let mut buf = [0u8; 16 * 1024];
        let mut i = 0;
        while i < self.sources.len() {
            let eof = loop {
                match self.sources[i].rx.try_read(&mut buf) {
                    Ok(0) => break true,
                    Ok(n) => self.sources[i].partial.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        say!("reading the runtime's output: {e}");
                        break true;
                    }
                }
            };
            let mut partial = mem::take(&mut self.sources[i].partial);
            let category = self.sources[i].category;
            let mut start = 0;
            while let Some(nl) = partial[start..].iter().position(|&b| b == b'\n') {
                let line = &partial[start..start + nl + 1];
                tap.line(category, line);
                self.push_line(line);
                start += nl + 1;
            }
            partial.drain(..start);
            if eof || partial.len() >= MAX_LINE {
                if !partial.is_empty() {
                    tap.line(category, &partial);
                    self.push_line(&partial);
                }
                partial.clear();
            }
            if eof {
                self.sources.swap_remove(i);
            } else {
                self.sources[i].partial = partial;
                i += 1;
            }
        }
    }

    /// Ends unterminated lines, so they belong to the invocation that wrote them.
    fn close_partials(&mut self) {
        for i in 0..self.sources.len() {
            let partial = mem::take(&mut self.sources[i].partial);
            if !partial.is_empty() {
                self.push_line(&partial);
            }
        }
    }
}

/// Collects the runtime's output and ships it to the host.
pub struct LogSink {
    upstream: Upstream,
    telemetry: Arc<Telemetry>,
    state: Mutex<State>,
    /// Serialises posting so batches reach the host in the order they were read.
    shipping: tokio::sync::Mutex<()>,
    new_lines: Notify,
}

impl LogSink {
    /// Creates the sink and its background shipper task.
    pub fn start(upstream: Upstream, telemetry: Arc<Telemetry>) -> Arc<Self> {
        let sink = Arc::new(LogSink {
            upstream,
            telemetry,
            state: Mutex::new(State::default()),
            shipping: tokio::sync::Mutex::new(()),
            new_lines: Notify::new(),
        });
        let shipper = sink.clone();
        tokio::spawn(async move {
            loop {
                shipper.new_lines.notified().await;
                tokio::time::sleep(BATCH_DELAY).await;
                shipper.ship().await;
            }
        });
        sink
    }

    /// A new pipe for one output stream of a runtime or extension (`category`): the
    /// write end goes to the child.
    pub fn pipe(self: &Arc<Self>, category: Category) -> io::Result<OwnedFd> {
        let (tx, rx) = pipe::pipe()?;
        let rx = Arc::new(rx);
        self.state().sources.push(Source {
            rx: rx.clone(),
            partial: Vec::new(),
            category,
        });
        let sink = self.clone();
        tokio::spawn(async move {
            // The sink's list holds the other reference until the pipe reaches end of file.
            while Arc::strong_count(&rx) > 1 {
                if rx.readable().await.is_err() {
                    break;
                }
                let has_lines = {
                    let mut state = sink.state();
                    state.drain(&sink.telemetry);
                    !state.batches.is_empty()
                };
                if has_lines {
                    sink.new_lines.notify_one();
                }
            }
        });
        tx.into_blocking_fd()
    }

    /// Lines read from now on belong to invocation `id`.
    pub fn begin_invocation(&self, id: &str) {
        let mut state = self.state();
        state.drain(&self.telemetry);
        state.request_id = Some(id.to_owned());
    }

    /// Everything the runtime wrote so far is posted before this returns; later lines
    /// belong to no invocation.
    pub async fn finish_invocation(&self) {
        {
            let mut state = self.state();
            state.drain(&self.telemetry);
            state.close_partials();
            // What was lost of this invocation's output is told within it.
            state.mark_dropped();
            state.request_id = None;
        }
        self.ship().await;
    }

    async fn ship(&self) {
        let _order = self.shipping.lock().await;
        let batches = {
            let mut state = self.state();
            // Lines dropped since the last queued one were the latest: their marker
            // goes after everything that waits.
            state.mark_dropped();
            state.pending = 0;
            mem::take(&mut state.batches)
        };
        for batch in batches {
            let mut headers = vec![(CONTENT_TYPE, HeaderValue::from_static("text/plain"))];
            if let Some(id) = batch.request_id.as_deref() {
                match HeaderValue::from_str(id) {
                    Ok(v) => headers.push((HeaderName::from_static(HEADER_REQUEST_ID), v)),
                    Err(_) => say!("request id {id:?} is not a valid header value"),
                }
            }
            if let Err(e) = self
                .upstream
                .post(PATH_LOGS, &headers, Bytes::from(batch.text))
                .await
            {
                say!("log lines lost: {e}");
            }
        }
    }

    /// Adds one line of the agent's own to the function log (Lambda's `EXTENSION` lines).
    pub fn note(&self, line: &str) {
        self.state().push_line(line.as_bytes());
        self.new_lines.notify_one();
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(state: &State) -> String {
        state
            .batches
            .iter()
            .map(|b| String::from_utf8_lossy(&b.text).into_owned())
            .collect()
    }

    #[test]
    fn past_the_bound_lines_are_dropped_and_a_marker_tells_how_many_bytes() {
        let mut state = State::default();
        let line = [b'a'; 1023];
        // 1 MiB fits exactly (1024-byte lines, a newline added to each).
        for _ in 0..1024 {
            state.push_line(&line);
        }
        assert_eq!((state.pending, state.dropped), (MAX_PENDING, 0));
        state.push_line(b"lost one\n");
        state.push_line(b"lost two");
        assert_eq!(state.dropped, 18);
        // Taken for posting: the marker follows what waited; then lines fit again.
        state.mark_dropped();
        let shipped = text(&state);
        assert!(shipped.ends_with(&format!("{}{}", "a".repeat(1023) + "\n", marker(18))));
        state.batches.clear();
        state.pending = 0;
        state.push_line(b"kept");
        assert_eq!(text(&state), "kept\n");
        // A drop in the middle: the marker comes before the first line after it.
        state.batches.clear();
        state.pending = 0;
        for _ in 0..1025 {
            state.push_line(&line);
        }
        state.batches.clear();
        state.pending = 0;
        state.push_line(b"after");
        assert_eq!(text(&state), format!("{}after\n", marker(1024)));
        assert_eq!(state.dropped, 0);
    }
}
