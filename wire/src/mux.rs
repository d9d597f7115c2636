//! Many connections over one byte stream: the agent↔host link of a microVM whose only line
//! to the host is a virtio-serial port (a QEMU VM that SnapStart snapshots: QEMU cannot
//! migrate its vhost-user vsock). Each connection the agent would open over vsock is a
//! yamux stream instead, opened by the guest ([`Opener`]); the host accepts them
//! ([`accept`]) and relays each to its Runtime API socket, as the vsock daemon relays a
//! vsock connection.
//!
//! Both ends stay bounded whatever the other sends: at most [`MAX_STREAMS`] streams (more
//! are reset), each with yamux's 256 KiB receive window and [`MAX_STREAMS`] × that for the
//! whole session; bytes that are not yamux end the session.

use std::future::poll_fn;
use std::io;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// The name of the virtio-serial port that carries the link (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "kindling-host";
/// Streams open at once on one session: the agent's frame stream and its small HTTP pool,
/// with room for streamed bodies.
pub const MAX_STREAMS: usize = 16;
/// yamux's initial (and smallest allowed) window of one stream.
const STREAM_WINDOW: usize = 256 * 1024;

/// One connection through the session, as a tokio byte stream.
pub type Stream = Compat<yamux::Stream>;

/// The session's limits, the same at both ends.
fn config() -> yamux::Config {
    let mut config = yamux::Config::default();
    // In this order: each setter checks the window holds every stream's.
    config
        .set_max_num_streams(MAX_STREAMS)
        .set_max_connection_receive_window(Some(MAX_STREAMS * STREAM_WINDOW));
    config
}

/// A request for a new stream, answered by the session's task.
type Ask = oneshot::Sender<io::Result<Stream>>;

/// The guest's end of a session: opens streams to the host. The session runs in a task of
/// its own, which ends (and every later [`Opener::open`] fails) when the link breaks,
/// the host closes it, or the host breaks the protocol.
#[derive(Debug)]
pub struct Opener {
    asks: mpsc::Sender<Ask>,
}

impl Opener {
    /// Starts a session over `io`.
    pub fn start<T>(io: T) -> Self
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (asks, mut asked) = mpsc::channel::<Ask>(MAX_STREAMS);
        let mut connection = yamux::Connection::new(io.compat(), config(), yamux::Mode::Client);
        tokio::spawn(async move {
            let mut pending: Option<Ask> = None;
            poll_fn(|cx| loop {
                if pending.is_none() {
                    match asked.poll_recv(cx) {
                        Poll::Ready(Some(ask)) => pending = Some(ask),
                        Poll::Ready(None) => return Poll::Ready(()),
                        Poll::Pending => {}
                    }
                }
                if let Some(ask) = pending.take() {
                    match connection.poll_new_outbound(cx) {
                        Poll::Ready(opened) => {
                            let _ = ask.send(opened.map(|s| s.compat()).map_err(io::Error::other));
                            continue;
                        }
                        Poll::Pending => pending = Some(ask),
                    }
                }
                // Drives the session; the host opens no streams, so any it opens is reset.
                match connection.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(_refused))) => continue,
                    Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            })
            .await;
        });
        Opener { asks }
    }

    /// Whether the session still runs.
    pub fn is_live(&self) -> bool {
        !self.asks.is_closed()
    }

    /// A new stream to the host.
    pub async fn open(&self) -> io::Result<Stream> {
        let ended = || io::Error::new(io::ErrorKind::ConnectionReset, "the host link ended");
        let (ask, answer) = oneshot::channel();
        self.asks.send(ask).await.map_err(|_| ended())?;
        answer.await.map_err(|_| ended())?
    }
}

/// The host's end of a session over `io`: hands each stream the guest opens to `serve`,
/// until the guest closes the link (`Ok`), the link fails (its I/O error), or the guest
/// breaks the protocol (an error of kind [`io::ErrorKind::InvalidData`]).
pub async fn accept<T>(io: T, mut serve: impl FnMut(Stream)) -> io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut connection = yamux::Connection::new(io.compat(), config(), yamux::Mode::Server);
    loop {
        match poll_fn(|cx| connection.poll_next_inbound(cx)).await {
            Some(Ok(stream)) => serve(stream.compat()),
            Some(Err(yamux::ConnectionError::Io(e))) => return Err(e),
            Some(Err(e)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Streams opened by the guest reach the host's `serve`, both ways, side by side.
    #[tokio::test]
    async fn streams_carry_bytes_both_ways() {
        let (guest, host) = tokio::io::duplex(64 * 1024);
        tokio::spawn(accept(host, |mut stream| {
            tokio::spawn(async move {
                let mut buf = [0u8; 5];
                stream.read_exact(&mut buf).await.unwrap();
                buf.reverse();
                stream.write_all(&buf).await.unwrap();
                stream.flush().await.unwrap();
            });
        }));
        let opener = Opener::start(guest);
        let mut a = opener.open().await.unwrap();
        let mut b = opener.open().await.unwrap();
        b.write_all(b"world").await.unwrap();
        a.write_all(b"hello").await.unwrap();
        a.flush().await.unwrap();
        b.flush().await.unwrap();
        let mut got = [0u8; 5];
        a.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"olleh");
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"dlrow");
        assert!(opener.is_live());
    }

    /// A guest that writes garbage loses its session; the host's end returns at once.
    #[tokio::test]
    async fn garbage_ends_the_session() {
        let (mut guest, host) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(accept(host, |_| panic!("no stream was opened")));
        guest.write_all(&[0xff; 4096]).await.unwrap();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), served)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ended.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    /// When the host's end goes away, the guest's session ends and opens fail.
    #[tokio::test]
    async fn a_closed_link_ends_the_opener() {
        let (guest, host) = tokio::io::duplex(1024);
        let opener = Opener::start(guest);
        drop(host);
        let failed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while opener.is_live() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(failed.is_ok());
        assert!(opener.open().await.is_err());
    }
}
