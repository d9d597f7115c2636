//! The host's end of a QEMU VM's serial link: the agent's connections to the host's
//! Runtime API carried as [`mux`] streams over one virtio-serial port instead of vsock
//! (used by VMs that SnapStart snapshots: QEMU cannot migrate vhost-user-vsock, and this
//! port migrates with the VM). QEMU serves the port's host end on a Unix socket in the
//! VM's socket folder; the host connects to it, runs the session, and relays each stream
//! the guest opens to the Runtime API socket linked into that folder, exactly as the
//! vsock daemon relays a guest connection to port 9001. A guest that breaks the protocol
//! loses its session, and with it its line to the host.

use std::io;
use std::path::{Path, PathBuf};

use kindling_wire::mux;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

/// A running session; dropping it ends the session and its relays.
pub struct SerialLink {
    session: JoinHandle<()>,
}

impl SerialLink {
    /// Connects to QEMU's end of the port at `chardev` and serves the session, relaying
    /// every stream to `runtime_api`.
    pub async fn connect(chardev: &Path, runtime_api: PathBuf) -> io::Result<Self> {
        let port = UnixStream::connect(chardev).await?;
        let session = tokio::spawn(async move {
            let served = mux::accept(port, |stream| {
                tokio::spawn(relay(stream, runtime_api.clone()));
            })
            .await;
            match served {
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    tracing::warn!(error = %e, "the guest broke its serial link's protocol; link closed");
                }
                Err(e) => tracing::debug!(error = %e, "the serial link failed"),
                Ok(()) => {}
            }
        });
        Ok(SerialLink { session })
    }

    /// Whether the session has ended.
    pub fn is_finished(&self) -> bool {
        self.session.is_finished()
    }

    /// Waits until the session ends (the guest's or QEMU's end closed, or the guest broke
    /// the protocol): the guest can no longer reach the host.
    pub async fn ended(&mut self) {
        let _ = (&mut self.session).await;
    }
}

impl Drop for SerialLink {
    fn drop(&mut self) {
        self.session.abort();
    }
}

/// Relays one stream to a connection of its own to the Runtime API socket.
async fn relay(mut stream: mux::Stream, runtime_api: PathBuf) {
    let relayed = match UnixStream::connect(&runtime_api).await {
        Ok(mut api) => tokio::io::copy_bidirectional(&mut stream, &mut api)
            .await
            .map(drop),
        Err(e) => Err(e),
    };
    if let Err(e) = relayed {
        tracing::debug!(error = %e, "a serial link stream ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    /// Streams the guest opens reach the Runtime API socket, one connection each; bytes
    /// that are not the protocol end the link.
    #[tokio::test]
    async fn streams_reach_the_runtime_api_and_garbage_ends_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let api_path = dir.path().join("api.sock");
        let api = UnixListener::bind(&api_path).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut connection, _) = api.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4];
                    connection.read_exact(&mut buf).await.unwrap();
                    connection
                        .write_all(&[buf, *b"-ok!"].concat())
                        .await
                        .unwrap();
                });
            }
        });
        let chardev_path = dir.path().join("host.sock");
        let chardev = UnixListener::bind(&chardev_path).unwrap();
        let link = SerialLink::connect(&chardev_path, api_path.clone())
            .await
            .unwrap();
        let (guest_end, _) = chardev.accept().await.unwrap();
        let opener = mux::Opener::start(guest_end);
        for word in [b"one!", b"two!"] {
            let mut stream = opener.open().await.unwrap();
            stream.write_all(word).await.unwrap();
            stream.flush().await.unwrap();
            let mut answer = [0u8; 8];
            stream.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, &[*word, *b"-ok!"].concat()[..]);
        }
        drop(link);

        let mut link = SerialLink::connect(&chardev_path, api_path).await.unwrap();
        let (mut hostile, _) = chardev.accept().await.unwrap();
        hostile.write_all(&[0x5a; 1 << 16]).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), link.ended())
            .await
            .unwrap();
    }
}
