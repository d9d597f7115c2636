//! The guest's end of a host link over a virtio-serial port ([`HostAddr::VirtioPort`]):
//! every connection to the host is a [`mux`] stream of one session on the port's device.
//!
//! The device is `/dev/vportNpM`, found by the port's name in sysfs (there is no udev to
//! make `/dev/virtio-ports/NAME`). While the host has the port's other end open, the
//! device reads and writes; while it does not, reads return end-of-file and `poll`
//! reports `POLLHUP` (Linux's virtio_console). That is how a snapshot's clone learns that
//! its session belongs to the past: QEMU's restore tells the guest the host end closed,
//! the session ends with EOF, its streams fail like vsock connections after
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, and the next connection starts a fresh session
//! once the host is back. Closing the device also discards what the old host left unread
//! in it.
//!
//! [`HostAddr::VirtioPort`]: kindling_wire::HostAddr::VirtioPort

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use kindling_wire::mux;
use kindling_wire::quiet_stream::poll_read_registered;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where Linux lists virtio-serial ports, each a folder named after its device.
const PORTS: &str = "/sys/class/virtio-ports";

/// The session on the port named `name`, started anew whenever the last one ended.
pub struct PortLink {
    name: String,
    session: tokio::sync::Mutex<Option<mux::Opener>>,
}

impl PortLink {
    pub fn new(name: &str) -> Self {
        PortLink {
            name: name.to_string(),
            session: tokio::sync::Mutex::new(None),
        }
    }

    /// A new connection to the host; fails (to be retried) while the host end is closed.
    pub async fn connect(&self) -> io::Result<mux::Stream> {
        let mut session = self.session.lock().await;
        let opener = match session.take() {
            Some(opener) if opener.is_live() => opener,
            // An ended session has closed its device (which takes one opener at a time).
            _ => mux::Opener::start(PortDevice::open(&device_of(Path::new(PORTS), &self.name)?)?),
        };
        let stream = opener.open().await?;
        *session = Some(opener);
        Ok(stream)
    }
}

/// The device of the port named `name`, from the ports listed under `ports`.
fn device_of(ports: &Path, name: &str) -> io::Result<PathBuf> {
    for entry in std::fs::read_dir(ports)? {
        let entry = entry?;
        let named = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if named.trim_end() == name {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "no virtio-serial port named {name:?} in {}",
            ports.display()
        ),
    ))
}

/// An open port device, non-blocking, driven by tokio's reactor.
struct PortDevice(AsyncFd<File>);

impl PortDevice {
    /// Opens `path`; refuses while the host end is closed (`POLLHUP`), as a vsock connect
    /// to an absent host is refused.
    fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        let mut poll = [PollFd::new(file.as_fd(), PollFlags::POLLOUT)];
        nix::poll::poll(&mut poll, PollTimeout::ZERO)?;
        if poll[0]
            .revents()
            .is_some_and(|events| events.contains(PollFlags::POLLHUP))
        {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("{}: the host end is closed", path.display()),
            ));
        }
        // SAFETY: `file` owns its descriptor, which the `AsyncFd` owns from here on and
        // neither replaces nor closes while it is registered.
        Ok(PortDevice(unsafe { AsyncFd::register(file)? }))
    }
}

impl AsyncRead for PortDevice {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        poll_read_registered(&self.0, cx, buf)
    }
}

impl AsyncWrite for PortDevice {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut ready = ready!(self.0.poll_write_ready(cx))?;
            match ready.try_io(|file| file.get_ref().write(bytes)) {
                Ok(written) => return Poll::Ready(written),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_found_by_its_name() {
        let ports = tempfile::tempdir().unwrap();
        for (device, name) in [
            ("vport0p0", "org.qemu.guest_agent.0"),
            ("vport1p1", "kindling-host"),
        ] {
            std::fs::create_dir(ports.path().join(device)).unwrap();
            std::fs::write(ports.path().join(device).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            device_of(ports.path(), "kindling-host").unwrap(),
            Path::new("/dev/vport1p1")
        );
        let missing = device_of(ports.path(), "other").unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
