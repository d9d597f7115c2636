//! A Unix stream socket that wakes its reactor only when there is something to read.
//!
//! tokio registers a socket for reading and writing at once, edge-triggered. A Unix stream
//! socket reports "writable" again every time its peer reads (the kernel runs its
//! write-space callback as each message is consumed), so on a frame stream, where one side
//! writes a message and then waits for the answer, the writer's thread is woken out of
//! `epoll_wait` once for nothing in between (measured in a sandbox's warm loop: the
//! server's threads were woken 6.6 times per invocation, ~1.3 of them for this alone; the
//! agent 4.4 times). [`QuietUnixStream`] is
//! registered for readability alone; writes go straight to the socket, and only a write
//! that finds the send buffer full registers a duplicate of the descriptor for
//! writability, for as long as it waits.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// See the module documentation.
#[derive(Debug)]
pub struct QuietUnixStream {
    socket: AsyncFd<UnixStream>,
    /// A duplicate of the socket registered for writability while a write waits for room.
    write_wait: Option<AsyncFd<OwnedFd>>,
}

impl QuietUnixStream {
    /// Takes over `socket` (made non-blocking here). Must be called within a tokio runtime.
    pub fn new(socket: UnixStream) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        // SAFETY: `socket` owns its descriptor, which the `AsyncFd` owns from here on and
        // neither replaces nor closes while it is registered.
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE)? };
        Ok(Self {
            socket,
            write_wait: None,
        })
    }
}

impl AsyncRead for QuietUnixStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        poll_read_registered(&self.socket, cx, buf)
    }
}

/// `poll_read` for a non-blocking descriptor registered with the reactor for reading:
/// reads what it has, else waits until it has something.
pub fn poll_read_registered<T>(
    registered: &AsyncFd<T>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>>
where
    T: AsRawFd,
    for<'a> &'a T: Read,
{
    loop {
        let mut ready = ready!(registered.poll_read_ready(cx))?;
        let unfilled = buf.initialize_unfilled();
        match ready.try_io(|registered| registered.get_ref().read(unfilled)) {
            Ok(read) => {
                buf.advance(read?);
                return Poll::Ready(Ok(()));
            }
            Err(_would_block) => continue,
        }
    }
}

impl AsyncWrite for QuietUnixStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match this.socket.get_ref().write(data) {
                Ok(written) => {
                    this.write_wait = None;
                    return Poll::Ready(Ok(written));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            // Registering checks the socket's state at once: room made since the failed
            // write is not missed.
            let wait = match &mut this.write_wait {
                Some(wait) => wait,
                None => {
                    let duplicate = this.socket.get_ref().as_fd().try_clone_to_owned()?;
                    // SAFETY: `duplicate` owns its descriptor (a new one, not the
                    // socket's), which the `AsyncFd` owns until it is dropped.
                    let registered =
                        unsafe { AsyncFd::register_with_interest(duplicate, Interest::WRITABLE)? };
                    this.write_wait.insert(registered)
                }
            };
            ready!(wait.poll_write_ready(cx))?.clear_ready();
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.socket.get_ref().shutdown(Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The calling thread's voluntary context switches: each time it slept and was woken.
    fn voluntary_switches() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("voluntary_ctxt_switches:"))
            .unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Waits until thread `tid` of this process sleeps (state `S`: in `epoll_wait` here).
    fn wait_until_asleep(tid: &str) {
        let stat = format!("/proc/self/task/{tid}/stat");
        for _ in 0..100_000 {
            let text = std::fs::read_to_string(&stat).unwrap();
            if text[text.rfind(')').unwrap()..].starts_with(") S") {
                return;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        panic!("thread {tid} never went to sleep");
    }

    /// Writes `messages` one-byte messages (each its own buffer in the kernel) from a
    /// runtime that then sits waiting for an answer, while the peer reads them one by one,
    /// each only once the runtime's thread sleeps; returns how often that thread was woken
    /// meanwhile.
    fn wakeups_while_the_peer_reads(quiet: bool, messages: usize) -> u64 {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let this_thread = std::fs::read_link("/proc/thread-self").unwrap();
            let tid = this_thread
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let peer = std::thread::spawn(move || {
                let mut theirs = theirs;
                let mut byte = [0u8; 1];
                for _ in 0..messages {
                    // A read wakes the writer (if it does) before it returns: waiting for
                    // sleep again lets every wake-up happen, and be counted, on its own.
                    wait_until_asleep(&tid);
                    theirs.read_exact(&mut byte).unwrap();
                }
                wait_until_asleep(&tid);
                theirs.write_all(b"!").unwrap();
            });
            let payload = vec![b'x'; messages];
            let mut answer = [0u8; 1];
            let before;
            if quiet {
                let mut stream = QuietUnixStream::new(ours).unwrap();
                for message in payload.chunks(1) {
                    stream.write_all(message).await.unwrap();
                }
                before = voluntary_switches();
                stream.read_exact(&mut answer).await.unwrap();
            } else {
                ours.set_nonblocking(true).unwrap();
                let mut stream = tokio::net::UnixStream::from_std(ours).unwrap();
                for message in payload.chunks(1) {
                    stream.write_all(message).await.unwrap();
                }
                before = voluntary_switches();
                stream.read_exact(&mut answer).await.unwrap();
            }
            let woken = voluntary_switches() - before;
            peer.join().unwrap();
            assert_eq!(&answer, b"!");
            woken
        })
    }

    #[test]
    fn the_peer_reading_does_not_wake_the_writer() {
        // tokio's own stream is the control: its thread wakes for (nearly) every read.
        let messages = 40;
        let tokio_stream = wakeups_while_the_peer_reads(false, messages);
        let quiet = wakeups_while_the_peer_reads(true, messages);
        assert!(
            tokio_stream >= messages as u64 / 2,
            "control: tokio's stream woke {tokio_stream} times"
        );
        assert!(quiet <= 3, "woken {quiet} times for {messages} reads");
    }

    #[tokio::test]
    async fn reads_what_the_peer_wrote_then_its_end() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut stream = QuietUnixStream::new(ours).unwrap();
        theirs.write_all(b"left").unwrap();
        theirs.write_all(b"over").unwrap();
        let mut got = [0u8; 8];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"leftover");
        drop(theirs);
        assert_eq!(stream.read(&mut got).await.unwrap(), 0, "end of stream");
    }

    #[tokio::test]
    async fn a_write_larger_than_the_buffer_waits_for_room() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut stream = QuietUnixStream::new(ours).unwrap();
        let sent: Vec<u8> = (0..8 << 20).map(|i: u32| i.to_le_bytes()[1]).collect();
        let reader = std::thread::spawn(move || {
            let mut theirs = theirs;
            std::thread::sleep(Duration::from_millis(50));
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).unwrap();
            got
        });
        stream.write_all(&sent).await.unwrap();
        stream.shutdown().await.unwrap();
        assert!(
            stream.write_wait.is_none(),
            "the duplicate is dropped after the wait"
        );
        let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        assert!(
            got == sent,
            "{} of {} bytes, or out of order",
            got.len(),
            sent.len()
        );
    }
}
