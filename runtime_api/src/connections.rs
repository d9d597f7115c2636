//! What one caller's connection may hold of the Invoke API: a connection that is slow to
//! send a request head (slowloris), or that sits idle between requests, is closed; past a
//! cap on open connections, new ones are answered 503 and closed.
//!
//! The two timeouts are measured here rather than with hyper's `header_read_timeout`:
//! hyper starts that clock as soon as it waits for a head, idle keep-alive time
//! included, so it could not tell a slow head from a connection resting between
//! requests. Here an [`Activity`] follows each connection through its phases:
//!
//! - *idle* from its accept, and again from the end of each answer, until the first byte
//!   of the next request: at most `keep_alive_timeout` (progress writing an answer to a
//!   slow reader counts as activity);
//! - *head* from that first byte until the request's head is complete: at most
//!   `header_read_timeout`, however the bytes trickle in;
//! - *busy* while the request is served: its body must arrive within `body_read_timeout`
//!   of the end of its head (the Invoke API answers 408 and closes the connection past
//!   it); the invocation that follows is bounded by the function's timeout.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::BodyBudget;

/// Bounds on the Invoke API's connections (see [`crate::ServerOptions`]).
#[derive(Debug, Clone)]
pub(crate) struct ConnectionLimits {
    /// From the first byte of a request to the end of its head.
    pub header_read_timeout: Duration,
    /// Between requests (and from accept to the first one).
    pub keep_alive_timeout: Duration,
    /// From the end of a request's head to the end of its body.
    pub body_read_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Callers' request bodies held at once, over every connection of the Invoke API and
    /// the function URLs together.
    pub bodies: BodyBudget,
}

/// Connections being refused at once, each for at most [`REFUSAL_GRACE`]; past that,
/// more are closed without an answer.
pub(crate) const MAX_REFUSING: usize = 64;
/// How long a refused connection is given to read its 503.
const REFUSAL_GRACE: Duration = Duration::from_secs(1);
/// How much of a refused client's request is read (and dropped) so that closing does
/// not reset the connection under its answer.
const REFUSAL_DRAIN: usize = 64 << 10;

#[derive(Debug, Clone, Copy)]
enum Phase {
    Idle(Instant),
    Head(Instant),
    Busy,
}

/// The phase of one connection, kept by its stream ([`Watched`]) and its service
/// ([`Activity::busy`]), watched by [`Activity::overstayed`].
#[derive(Debug)]
pub(crate) struct Activity {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            phase: Mutex::new(Phase::Idle(Instant::now())),
            changed: Notify::new(),
        })
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arrived: the first ones after idling start a request head.
    fn read(&self) {
        let mut phase = self.phase();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Head(Instant::now());
            self.changed.notify_one();
        }
    }

    /// Bytes left: an answer being written to a slow reader is not idleness.
    fn wrote(&self) {
        let mut phase = self.phase();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Idle(Instant::now());
        }
    }

    /// A request's head is complete and it is being served, until the guard drops.
    pub fn busy(self: &Arc<Self>) -> Busy {
        *self.phase() = Phase::Busy;
        self.changed.notify_one();
        Busy(self.clone())
    }

    /// Resolves when the connection has been idle or sending a head for too long, with
    /// which.
    pub async fn overstayed(&self, limits: &ConnectionLimits) -> &'static str {
        loop {
            let changed = self.changed.notified();
            // A limit too far to reach (`Duration::MAX`) is no limit.
            let deadline = match *self.phase() {
                Phase::Idle(since) => since
                    .checked_add(limits.keep_alive_timeout)
                    .map(|at| (at, "idle")),
                Phase::Head(since) => since
                    .checked_add(limits.header_read_timeout)
                    .map(|at| (at, "slow head")),
                Phase::Busy => None,
            };
            match deadline {
                None => changed.await,
                Some((at, why)) if Instant::now() >= at => return why,
                Some((at, _)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = changed => {}
                    }
                }
            }
        }
    }
}

/// A request being served; dropping it makes the connection idle.
#[derive(Debug)]
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.phase() = Phase::Idle(Instant::now());
        self.0.changed.notify_one();
    }
}

/// A connection's stream, telling its [`Activity`] of bytes in and out.
#[derive(Debug)]
pub(crate) struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl Watched {
    pub fn new(stream: TcpStream, activity: Arc<Activity>) -> Self {
        Self { stream, activity }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The answer a connection past the cap gets: 503 `ServiceException`, `Connection: close`.
pub(crate) fn refusal(max_connections: usize) -> Bytes {
    let body = json!({
        "Type": "Service",
        "message": format!(
            "The Invoke API has {max_connections} connections open, as many as it serves at once: retry later"
        ),
    })
    .to_string();
    Bytes::from(format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         x-amzn-errortype: ServiceException\r\nretry-after: 1\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    ))
}

/// Answers `answer` (see [`refusal`]) without waiting for the request, then reads what
/// the client sends until it closes, within [`REFUSAL_GRACE`] and [`REFUSAL_DRAIN`].
pub(crate) async fn refuse(mut stream: TcpStream, answer: Bytes) {
    let _ = tokio::time::timeout(REFUSAL_GRACE, async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN {
            match stream.read(&mut buf).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, io::Error>(())
    })
    .await;
}
