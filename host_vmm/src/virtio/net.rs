//! virtio-net over a host tap device (virtio 1.2 §5.1), on Firecracker's model: two queues
//! (0 = RX, 1 = TX), the tap opened by name with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, and the
//! 12-byte `virtio_net_hdr_v1` in front of every frame on both sides (`TUNSETVNETHDRSZ`).
//!
//! Features: `VIRTIO_F_VERSION_1`, and `VIRTIO_NET_F_MAC` when a guest MAC is configured
//! (without one the guest makes its own up, as under Firecracker). No offloads: the guest
//! sends whole, checksummed frames and the tap, its offloads off (`TUNSETOFFLOAD 0` at open),
//! hands over the same. So a frame is checked by its size and a header whose offload fields
//! are zero, and no thread but the one that opened the tap ever changes its settings.
//!
//! TX runs on the vCPU that notified the queue (like block); RX on the VMM's event loop
//! ([`NetEvents`]), which watches the tap only while the guest has RX buffers and is woken by
//! a kick from the vCPU when the guest posts new ones. Each turn moves at most
//! [`FRAMES_PER_TURN`] frames, so neither a flooding guest nor a flooding host holds the
//! device; TX left over by a vCPU is finished on the event loop. Every chain is parsed
//! ([`TxFrame::parse`], [`RxBuffer::parse`]) before a byte is moved.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_HDR_GSO_NONE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use super::{
    checked_descriptors, read_config_bytes, DescriptorError, GuestWarnings, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemory;

/// virtio device id of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// `virtio_net_hdr_v1`: the header of every frame once `VIRTIO_F_VERSION_1` is negotiated,
/// and the vnet header size the tap is set to.
pub const NET_HDR_LEN: usize = 12;
/// An Ethernet header: the least a frame carries besides the virtio header.
const ETH_HLEN: usize = 14;
/// Largest virtio header + frame either way (Firecracker's bound: a 64 KiB frame behind an
/// Ethernet and a virtio header).
pub const MAX_BUFFER_LEN: usize = 65562;
/// Most frames one direction moves per turn.
pub const FRAMES_PER_TURN: usize = 64;

/// A MAC address, written `06:00:ac:10:00:02` as in Firecracker's `guest_mac`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid MAC address {s:?} (six hex pairs: 06:00:ac:10:00:02)");
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            // Two hex digits (from_str_radix alone would also take "+6").
            let part = parts
                .next()
                .filter(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(bad)?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        match parts.next() {
            None => Ok(MacAddr(bytes)),
            Some(_) => Err(bad()),
        }
    }
}

impl TryFrom<String> for MacAddr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(mac: MacAddr) -> String {
        mac.to_string()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The fields of `virtio_net_hdr_v1` this device looks at; the others (`hdr_len`,
/// `gso_size`, `csum_start`, `csum_offset`) only mean something with offloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub num_buffers: u16,
}

impl NetHeader {
    /// The header of a frame this device hands the guest: no flags, no segmentation, one
    /// buffer (virtio 1.2 §5.1.6.4.1, without `VIRTIO_NET_F_MRG_RXBUF`).
    const RX: NetHeader = NetHeader {
        flags: 0,
        gso_type: 0,
        num_buffers: 1,
    };

    /// Reads the header at the start of `frame` (at least [`NET_HDR_LEN`] bytes).
    pub fn read(frame: &[u8]) -> Option<NetHeader> {
        let hdr = frame.get(..NET_HDR_LEN)?;
        Some(NetHeader {
            flags: hdr[0],
            gso_type: hdr[1],
            num_buffers: u16::from_le_bytes([hdr[10], hdr[11]]),
        })
    }

    /// Overwrites the header at the start of `frame`, the fields not kept here zeroed.
    fn write(self, frame: &mut [u8]) {
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr[0] = self.flags;
        hdr[1] = self.gso_type;
        hdr[10..].copy_from_slice(&self.num_buffers.to_le_bytes());
        frame[..NET_HDR_LEN].copy_from_slice(&hdr);
    }

    /// Refuses a header that asks for checksum or segmentation offloads, none of which are
    /// negotiated.
    fn check_plain(self) -> Result<(), FrameError> {
        if self.flags != 0 || u32::from(self.gso_type) != VIRTIO_NET_HDR_GSO_NONE {
            return Err(FrameError::Offload {
                flags: self.flags,
                gso_type: self.gso_type,
            });
        }
        Ok(())
    }
}

/// Why a chain or a frame cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Descriptors(#[from] DescriptorError),
    #[error("a TX chain has a device-writable descriptor")]
    WritableTx,
    #[error("an RX chain has a device-readable descriptor")]
    ReadableRx,
    #[error("{0} bytes: shorter than the virtio and Ethernet headers")]
    TooShort(u64),
    #[error("{0} bytes: more than {MAX_BUFFER_LEN}")]
    TooLong(u64),
    #[error("RX buffer of {0} bytes: no room for the virtio header")]
    NoRoom(u64),
    #[error("a frame of {frame} bytes does not fit an RX buffer of {buffer}")]
    DoesNotFit { frame: usize, buffer: u64 },
    #[error("offloads were not negotiated (flags {flags:#x}, gso_type {gso_type})")]
    Offload { flags: u8, gso_type: u8 },
}

/// Checks that a frame of `len` bytes, headers included, may cross the device.
fn check_frame_len(len: u64) -> Result<(), FrameError> {
    let fits = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    if len < fits(NET_HDR_LEN + ETH_HLEN) {
        return Err(FrameError::TooShort(len));
    }
    if len > fits(MAX_BUFFER_LEN) {
        return Err(FrameError::TooLong(len));
    }
    Ok(())
}

/// Sum of the descriptors' lengths: at most a queue's worth of `u32`s, no overflow.
fn total_len(descs: &[Descriptor]) -> u64 {
    descs.iter().map(|d| u64::from(d.len())).sum()
}

/// A guest frame, checked and copied out of guest memory, its header zeroed: what the tap
/// receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxFrame(Vec<u8>);

impl TxFrame {
    /// Parses one TX chain: device-readable descriptors only, header and frame between the
    /// Ethernet minimum and [`MAX_BUFFER_LEN`], a header asking for no offloads.
    pub fn parse(
        descriptors: impl Iterator<Item = Descriptor>,
        mem: &GuestMemory,
    ) -> Result<Self, FrameError> {
        let descs = checked_descriptors(descriptors, mem)?;
        if descs.iter().any(Descriptor::is_write_only) {
            return Err(FrameError::WritableTx);
        }
        let len = total_len(&descs);
        check_frame_len(len)?;
        let mut bytes = vec![0u8; usize::try_from(len).map_err(|_| FrameError::TooLong(len))?];
        let mut at = 0;
        for d in &descs {
            let end = at + d.len() as usize;
            mem.read_slice(&mut bytes[at..end], d.addr()).map_err(|_| {
                DescriptorError::OutOfRange {
                    addr: d.addr().0,
                    len: d.len(),
                }
            })?;
            at = end;
        }
        let header = NetHeader::read(&bytes).ok_or(FrameError::TooShort(len))?;
        header.check_plain()?;
        NetHeader {
            num_buffers: 0,
            ..header
        }
        .write(&mut bytes);
        Ok(TxFrame(bytes))
    }

    /// The header and frame, as the tap takes them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A guest RX buffer: device-writable descriptors, checked, with room for a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxBuffer {
    descs: Vec<(GuestAddress, u32)>,
    capacity: u64,
}

impl RxBuffer {
    /// Parses one RX chain.
    pub fn parse(
        descriptors: impl Iterator<Item = Descriptor>,
        mem: &GuestMemory,
    ) -> Result<Self, FrameError> {
        let descs = checked_descriptors(descriptors, mem)?;
        if !descs.iter().all(Descriptor::is_write_only) {
            return Err(FrameError::ReadableRx);
        }
        let capacity = total_len(&descs);
        if capacity < u64::try_from(NET_HDR_LEN).unwrap_or(u64::MAX) {
            return Err(FrameError::NoRoom(capacity));
        }
        Ok(Self {
            descs: descs.iter().map(|d| (d.addr(), d.len())).collect(),
            capacity,
        })
    }

    /// Puts `frame`, a frame as the tap hands it over (its header first), in the buffer with
    /// this device's RX header in place of the tap's. Returns the used length; a frame that
    /// does not fit is refused and the buffer left as it was.
    pub fn write_frame(&self, frame: &mut [u8], mem: &GuestMemory) -> Result<u32, FrameError> {
        let len = u64::try_from(frame.len()).unwrap_or(u64::MAX);
        check_frame_len(len)?;
        NetHeader::read(frame)
            .ok_or(FrameError::TooShort(len))?
            .check_plain()?;
        if len > self.capacity {
            return Err(FrameError::DoesNotFit {
                frame: frame.len(),
                buffer: self.capacity,
            });
        }
        NetHeader::RX.write(frame);
        let mut rest: &[u8] = frame;
        for &(addr, len) in &self.descs {
            let (part, tail) = rest.split_at(rest.len().min(len as usize));
            mem.write_slice(part, addr)
                .map_err(|_| DescriptorError::OutOfRange {
                    addr: addr.0,
                    len: u32::try_from(part.len()).unwrap_or(len),
                })?;
            rest = tail;
            if rest.is_empty() {
                break;
            }
        }
        u32::try_from(frame.len()).map_err(|_| FrameError::TooLong(len))
    }
}

/// A tap device, opened by name or adopted from an inherited descriptor, non-blocking;
/// every frame read or written has a `virtio_net_hdr_v1` in front.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `ioctl(2)`'s -1 as the error it means.
fn check_ioctl(ret: libc::c_int, what: &str) -> io::Result<()> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// The flags every tap of a network device has: an Ethernet device, no packet information
/// in front of a frame, a virtio-net header instead.
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

impl Tap {
    /// Opens (as root: creates, if missing) the tap `name`, with the vnet header of
    /// [`NET_HDR_LEN`] bytes and no offloads.
    pub fn open(name: &str) -> io::Result<Self> {
        let in_name = |e: io::Error| io::Error::new(e.kind(), format!("tap {name}: {e}"));
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(in_name(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a name of 1 to {} bytes", libc::IFNAMSIZ - 1),
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| in_name(io::Error::new(e.kind(), format!("/dev/net/tun: {e}"))))?;
        // SAFETY: `ifreq` is plain integers and unions of them: all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, &src) in req.ifr_name.iter_mut().zip(bytes) {
            *dst = libc::c_char::from_ne_bytes([src]);
        }
        req.ifr_ifru.ifru_flags = libc::c_short::try_from(TAP_FLAGS)
            .map_err(|_| in_name(io::Error::other("tap flags do not fit a short")))?;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which outlives the call; the fd is
        // the tun device just opened.
        let ret =
            unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut req) };
        check_ioctl(ret, "TUNSETIFF").map_err(in_name)?;
        Self::ready(file, name)
    }

    /// Kindling's `host_dev_fd`: takes over descriptor `fd`, which the VMM inherited open
    /// (a jailed VMM can neither see the host's taps nor create one), once `TUNGETIFF`
    /// shows that it is the tap `name` with a vnet header and no packet information. The
    /// caller adopts every inherited descriptor before opening any tap by name, so a tap
    /// at `fd` is one the VMM does not hold already.
    pub fn adopt(fd: RawFd, name: &str) -> io::Result<Self> {
        let refused = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("host_dev_fd {fd} ({name}): {why}"),
            )
        };
        if fd <= libc::STDERR_FILENO {
            return Err(refused("0, 1 and 2 are the standard streams".into()));
        }
        // SAFETY: `ifreq` is plain integers and unions of them: all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF only writes one `ifreq`, which outlives the call; on a
        // descriptor that is not open, or not a tap, the kernel answers an error.
        let ret = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req as *mut libc::ifreq) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(refused(format!("not a tap (TUNGETIFF: {e})")));
        }
        // SAFETY: TUNGETIFF succeeded, so the kernel wrote the name and the flags.
        let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags });
        if flags & TAP_FLAGS != TAP_FLAGS || flags & libc::IFF_TUN != 0 {
            return Err(refused(format!(
                "not a tap with a vnet header and no packet information (flags {flags:#x})"
            )));
        }
        let actual: Vec<u8> = req
            .ifr_name
            .iter()
            .map(|c| c.to_ne_bytes()[0])
            .take_while(|&b| b != 0)
            .collect();
        if actual != name.as_bytes() {
            return Err(refused(format!(
                "the tap is {:?}",
                String::from_utf8_lossy(&actual)
            )));
        }
        // SAFETY: `fd` is open (TUNGETIFF answered on it) and owned by nothing else in
        // this process (see above); the `File` is its one owner from here.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // Non-blocking, as an opened tap: the event loop reads until EAGAIN.
        // SAFETY: fcntl(F_GETFL/F_SETFL/F_SETFD) on a descriptor the `File` owns.
        let ret = unsafe {
            let status = libc::fcntl(fd, libc::F_GETFL);
            if status < 0 {
                status
            } else if libc::fcntl(fd, libc::F_SETFL, status | libc::O_NONBLOCK) < 0
                || libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) < 0
            {
                -1
            } else {
                0
            }
        };
        check_ioctl(ret, "fcntl").map_err(|e| refused(e.to_string()))?;
        Self::ready(file, name)
    }

    /// The vnet header of [`NET_HDR_LEN`] bytes and no offloads on the tap `file`.
    fn ready(file: File, name: &str) -> io::Result<Self> {
        let in_name = |e: io::Error| io::Error::new(e.kind(), format!("tap {name}: {e}"));
        let hdr_len = libc::c_int::try_from(NET_HDR_LEN).unwrap_or(libc::c_int::MAX);
        // SAFETY: TUNSETVNETHDRSZ reads one int, which outlives the call.
        let ret =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ, &hdr_len) };
        check_ioctl(ret, "TUNSETVNETHDRSZ").map_err(in_name)?;
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_val(&file, libc::TUNSETOFFLOAD, 0) };
        check_ioctl(ret, "TUNSETOFFLOAD").map_err(in_name)?;
        Ok(Self {
            file,
            name: name.to_owned(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        let n = (&self.file).write(frame)?;
        if n != frame.len() {
            return Err(io::Error::other(format!(
                "{n} of {} bytes written",
                frame.len()
            )));
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// The network device.
#[derive(Debug)]
pub struct Net {
    iface_id: String,
    tap: Tap,
    guest_mac: Option<MacAddr>,
    /// Wakes the event loop: the device went live, the guest posted RX buffers while RX was
    /// stalled, or a vCPU left TX work over.
    kick: EventFd,
    /// RX waits for guest buffers (or for the device to go live): the tap is not watched.
    rx_stalled: bool,
    /// TX chains are waiting for the event loop.
    tx_pending: bool,
    /// One frame from the tap.
    frame: Vec<u8>,
    warnings: GuestWarnings,
}

impl Net {
    /// A device for interface `iface_id` over `tap`.
    pub fn new(iface_id: &str, tap: Tap, guest_mac: Option<MacAddr>) -> io::Result<Self> {
        Ok(Self {
            iface_id: iface_id.to_owned(),
            tap,
            guest_mac,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            rx_stalled: true,
            tx_pending: false,
            frame: vec![0; MAX_BUFFER_LEN],
            warnings: GuestWarnings::default(),
        })
    }

    /// What a snapshot needs to rebuild the device.
    pub fn state(&self) -> NetState {
        NetState {
            iface_id: self.iface_id.clone(),
            host_dev_name: self.tap.name.clone(),
            guest_mac: self.guest_mac,
        }
    }

    fn kick(&self) {
        if let Err(e) = self.kick.write(1) {
            tracing::warn!("net {}: waking the event loop: {e}", self.iface_id);
        }
    }

    /// Moves at most [`FRAMES_PER_TURN`] guest frames to the tap; what is left over is the
    /// event loop's. Returns whether chains were used.
    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        for _ in 0..FRAMES_PER_TURN {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                self.tx_pending = false;
                return used;
            };
            let head = chain.head_index();
            match TxFrame::parse(chain, mem) {
                // A frame the tap refuses (it is down, say) is lost, as on a wire.
                Ok(frame) => {
                    if let Err(e) = self.tap.write_frame(frame.as_bytes()) {
                        tracing::debug!("net {}: frame to the tap lost: {e}", self.iface_id);
                    }
                }
                Err(e) => {
                    let id = &self.iface_id;
                    self.warnings
                        .warn(format_args!("net {id}: dropped a TX chain: {e}"));
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::warn!("net {} TX queue: {e}", self.iface_id);
                return used;
            }
            used = true;
        }
        self.tx_pending = queue
            .avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != queue.next_avail());
        if self.tx_pending {
            self.kick();
        }
        used
    }

    /// Moves at most [`FRAMES_PER_TURN`] frames from the tap into guest RX buffers; stalls
    /// when the guest has none. A frame that does not fit the next buffer is dropped and the
    /// buffer kept. Returns whether buffers were used.
    fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        self.rx_stalled = false;
        for _ in 0..FRAMES_PER_TURN {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                self.rx_stalled = true;
                return used;
            };
            let head = chain.head_index();
            let buffer = match RxBuffer::parse(chain, mem) {
                Ok(buffer) => buffer,
                Err(e) => {
                    let id = &self.iface_id;
                    self.warnings
                        .warn(format_args!("net {id}: dropped an RX chain: {e}"));
                    if let Err(e) = queue.add_used(mem, head, 0) {
                        tracing::warn!("net {} RX queue: {e}", self.iface_id);
                        return used;
                    }
                    used = true;
                    continue;
                }
            };
            let len = match self.tap.read_frame(&mut self.frame) {
                Ok(len) => len,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::warn!("net {}: reading the tap: {e}", self.iface_id);
                    }
                    queue.go_to_previous_position();
                    return used;
                }
            };
            match buffer.write_frame(&mut self.frame[..len], mem) {
                Ok(written) => {
                    if let Err(e) = queue.add_used(mem, head, written) {
                        tracing::warn!("net {} RX queue: {e}", self.iface_id);
                        return used;
                    }
                    used = true;
                }
                Err(e) => {
                    tracing::debug!("net {}: frame from the tap lost: {e}", self.iface_id);
                    queue.go_to_previous_position();
                }
            }
        }
        used
    }

    /// The event loop's turn: TX a vCPU left over, then RX. Returns whether buffers were used.
    fn process_host(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let tx = self.tx_pending && self.process_tx(&mut queues[TX_QUEUE], mem);
        let rx = self.process_rx(&mut queues[RX_QUEUE], mem);
        tx || rx
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        let mac = match self.guest_mac {
            Some(_) => 1 << VIRTIO_NET_F_MAC,
            None => 0,
        };
        VIRTIO_F_VERSION_1 | mac
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Only `mac` is offered (and only with VIRTIO_NET_F_MAC).
        let mac = self.guest_mac.map(|m| m.0).unwrap_or_default();
        read_config_bytes(&mac, offset, data);
    }

    fn activate(&mut self, _acked_features: u64) {
        // The event loop starts RX and picks up any TX a restored guest had queued.
        self.tx_pending = true;
        self.kick();
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        match index {
            TX_QUEUE => self.process_tx(&mut queues[TX_QUEUE], mem),
            _ => {
                // New RX buffers: only the event loop reads the tap.
                if self.rx_stalled {
                    self.kick();
                }
                false
            }
        }
    }
}

/// A network device in a snapshot: the tap is opened again by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub iface_id: String,
    pub host_dev_name: String,
    pub guest_mac: Option<MacAddr>,
}

/// The `data` of the event loop's two sources.
const TAP_EVENT: u32 = 0;
const KICK_EVENT: u32 = 1;

/// The event-loop side of a network device: RX from the tap, and the work the vCPUs hand
/// over through the kick.
#[derive(Debug)]
pub struct NetEvents {
    transport: Arc<Mutex<MmioTransport<Net>>>,
    tap: RawFd,
    kick: RawFd,
    /// The tap is in the epoll set.
    tap_watched: bool,
    /// The tap reported an error or a hang-up: it is never watched again.
    tap_failed: bool,
}

impl NetEvents {
    pub fn new(transport: Arc<Mutex<MmioTransport<Net>>>) -> Self {
        let (tap, kick) = {
            let t = transport.lock().unwrap_or_else(|e| e.into_inner());
            (t.device().tap.as_raw_fd(), t.device().kick.as_raw_fd())
        };
        Self {
            transport,
            tap,
            kick,
            tap_watched: false,
            tap_failed: false,
        }
    }

    fn tap_events(&self) -> Events {
        Events::with_data_raw(self.tap, TAP_EVENT, EventSet::IN)
    }
}

impl MutEventSubscriber for NetEvents {
    fn init(&mut self, ops: &mut EventOps) {
        // The tap joins once the device is live (its activation kicks).
        if let Err(e) = ops.add(Events::with_data_raw(self.kick, KICK_EVENT, EventSet::IN)) {
            tracing::error!("net: cannot watch the device's kick: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut transport = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        let iface_id = transport.device().iface_id.clone();
        if events.data() == KICK_EVENT {
            // Only consume the wake-up; what it asks for is in the device's state.
            let _ = transport.device().kick.read();
        } else if events
            .event_set()
            .intersects(EventSet::ERROR | EventSet::HANG_UP)
        {
            tracing::error!("net {iface_id}: the tap failed; no more frames from it");
            self.tap_failed = true;
        }
        let live = transport.run_device(Net::process_host);
        let watch = live && !self.tap_failed && !transport.device().rx_stalled;
        drop(transport);
        if watch != self.tap_watched {
            let changed = if watch {
                ops.add(self.tap_events())
            } else {
                ops.remove(self.tap_events())
            };
            match changed {
                Ok(()) => self.tap_watched = watch,
                Err(e) => tracing::error!("net {iface_id}: watching the tap: {e:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use crate::virtio::test_rings::{queues, ring};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;

    const SIZE: u16 = 128;
    const WRITE: u16 = 2;
    const NEXT: u16 = 1;

    #[test]
    fn mac_addresses_parse_and_print() {
        let mac: MacAddr = "06:00:AC:10:00:02".parse().unwrap();
        assert_eq!(mac.0, [6, 0, 0xac, 0x10, 0, 2]);
        assert_eq!(mac.to_string(), "06:00:ac:10:00:02");
        for bad in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "6:00:ac:10:00:02",
            "06:00:ac:10:00:0g",
            "06-00-ac-10-00-02",
            "+6:00:ac:10:00:02",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} parsed");
        }
        let json: MacAddr = serde_json::from_str(r#""06:00:ac:10:00:02""#).unwrap();
        assert_eq!(json, mac);
        assert_eq!(
            serde_json::to_string(&mac).unwrap(),
            r#""06:00:ac:10:00:02""#
        );
    }

    /// The device over one end of a datagram socket pair, which keeps frame boundaries as a
    /// tap does; the test plays the host network on the other end.
    fn device(mac: Option<MacAddr>) -> (Net, UnixDatagram) {
        let (ours, host) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let tap = Tap {
            file: File::from(OwnedFd::from(ours)),
            name: "test0".into(),
        };
        (Net::new("eth0", tap, mac).unwrap(), host)
    }

    #[test]
    fn features_and_config_offer_the_mac_only_when_there_is_one() {
        let mac = MacAddr([6, 0, 0xac, 0x10, 0, 2]);
        let (net, _) = device(Some(mac));
        assert_eq!(net.features(), VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC);
        let mut config = [0xffu8; 8];
        net.read_config(0, &mut config);
        assert_eq!(config, [6, 0, 0xac, 0x10, 0, 2, 0, 0]);
        let mut tail = [0xffu8; 2];
        net.read_config(4, &mut tail);
        assert_eq!(tail, [0, 2]);

        let (net, _) = device(None);
        assert_eq!(net.features(), VIRTIO_F_VERSION_1);
        assert_eq!(net.queue_max_sizes(), [256, 256]);
        assert_eq!(net.device_type(), 1);
    }

    /// The driver's side of both queues, in real guest memory.
    struct Driver {
        mem: GuestMemory,
        queues: Vec<Queue>,
        avail: [u16; 2],
        used_seen: [u16; 2],
    }

    /// Guest buffers of a page each, for RX from 1 MiB, for TX from 2 MiB.
    fn buffer(q: usize, slot: u16) -> u64 {
        [0x10_0000, 0x20_0000][q] + 0x1000 * u64::from(slot)
    }

    impl Driver {
        fn new() -> Self {
            Self {
                mem: create_guest_memory(8).unwrap(),
                queues: queues(2, SIZE),
                avail: [0; 2],
                used_seen: [0; 2],
            }
        }

        /// Publishes a chain of `(addr, len, flags)` descriptors in queue `q`, from slot
        /// `first` on; returns the head.
        fn publish(&mut self, q: usize, first: u16, descs: &[(u64, u32, u16)]) -> u16 {
            let (d, a, _) = ring(q);
            for (i, &(addr, len, flags)) in (first..).zip(descs) {
                let next = (i + 1) % SIZE;
                let desc = Descriptor::new(addr, len, flags, next);
                self.mem
                    .write_obj(desc, GuestAddress(d + 16 * u64::from(i % SIZE)))
                    .unwrap();
            }
            let idx = self.avail[q];
            self.mem
                .write_obj(first, GuestAddress(a + 4 + 2 * u64::from(idx % SIZE)))
                .unwrap();
            self.avail[q] = idx.wrapping_add(1);
            self.mem
                .write_obj(self.avail[q], GuestAddress(a + 2))
                .unwrap();
            first
        }

        /// Posts an RX buffer of `len` bytes in descriptor `slot`.
        fn give_rx(&mut self, slot: u16, len: u32) {
            self.publish(RX_QUEUE, slot, &[(buffer(RX_QUEUE, slot), len, WRITE)]);
        }

        /// Puts `frame` (header included) in TX descriptor `slot` and publishes it.
        fn send(&mut self, slot: u16, frame: &[u8]) {
            let addr = buffer(TX_QUEUE, slot);
            self.mem.write_slice(frame, GuestAddress(addr)).unwrap();
            let len = u32::try_from(frame.len()).unwrap();
            self.publish(TX_QUEUE, slot, &[(addr, len, 0)]);
        }

        /// The (head, len) entries queue `q` used since the last call.
        fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
            let (_, _, u) = ring(q);
            let idx: u16 = self.mem.read_obj(GuestAddress(u + 2)).unwrap();
            let mut out = Vec::new();
            while self.used_seen[q] != idx {
                let e = u + 4 + 8 * u64::from(self.used_seen[q] % SIZE);
                out.push((
                    self.mem.read_obj(GuestAddress(e)).unwrap(),
                    self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
                ));
                self.used_seen[q] = self.used_seen[q].wrapping_add(1);
            }
            out
        }

        fn read(&self, addr: u64, len: u32) -> Vec<u8> {
            let mut buf = vec![0; len as usize];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        }
    }

    /// A frame as it crosses the device: a header with `flags` and `gso_type`, then an
    /// Ethernet frame of `len` bytes that starts with `tag`.
    fn frame(flags: u8, gso_type: u8, tag: u8, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; NET_HDR_LEN];
        f[0] = flags;
        f[1] = gso_type;
        f[2..10].fill(0x55); // hdr_len .. csum_offset: meaningless without offloads
        f.extend((0..len).map(|i| tag.wrapping_add(u8::try_from(i & 0xff).unwrap())));
        f
    }

    fn kicks(net: &Net) -> u64 {
        net.kick.read().unwrap_or(0)
    }

    #[test]
    fn guest_frames_reach_the_tap_with_a_clean_header() {
        let (mut net, host) = device(None);
        let mut drv = Driver::new();
        drv.send(0, &frame(0, 0, 0xa0, 60));
        drv.send(1, &frame(0, 0, 0xb0, 1514));
        assert!(net.process_queue(TX_QUEUE, &mut drv.queues, &drv.mem));
        assert_eq!(drv.used(TX_QUEUE), [(0, 0), (1, 0)]);
        let mut buf = [0u8; 2048];
        for (tag, len) in [(0xa0, 60), (0xb0, 1514)] {
            let n = host.recv(&mut buf).unwrap();
            assert_eq!(n, NET_HDR_LEN + len);
            assert_eq!(buf[..NET_HDR_LEN], [0; NET_HDR_LEN], "header zeroed");
            assert_eq!(buf[NET_HDR_LEN..n], frame(0, 0, tag, len)[NET_HDR_LEN..]);
        }
        assert_eq!(kicks(&net), 0, "nothing left for the event loop");
    }

    #[test]
    fn a_frame_split_over_descriptors_is_gathered() {
        let (mut net, host) = device(None);
        let mut drv = Driver::new();
        let f = frame(0, 0, 1, 100);
        let addr = buffer(TX_QUEUE, 0);
        drv.mem
            .write_slice(&f[..NET_HDR_LEN], GuestAddress(addr))
            .unwrap();
        drv.mem
            .write_slice(&f[NET_HDR_LEN..], GuestAddress(addr + 0x1000))
            .unwrap();
        drv.publish(TX_QUEUE, 0, &[(addr, 12, NEXT), (addr + 0x1000, 100, 0)]);
        assert!(net.process_queue(TX_QUEUE, &mut drv.queues, &drv.mem));
        let mut buf = [0u8; 256];
        let n = host.recv(&mut buf).unwrap();
        assert_eq!(buf[NET_HDR_LEN..n], f[NET_HDR_LEN..]);
    }

    #[test]
    fn bad_tx_chains_are_used_and_nothing_reaches_the_tap() {
        let (mut net, host) = device(None);
        let mut drv = Driver::new();
        let addr = buffer(TX_QUEUE, 0);
        // Checksum offload, segmentation, too short, too long, device-writable.
        drv.send(0, &frame(1, 0, 0, 60));
        drv.send(1, &frame(0, 1, 0, 60));
        drv.send(2, &frame(0, 0, 0, 13));
        let too_long = u32::try_from(MAX_BUFFER_LEN).unwrap() + 1;
        drv.publish(TX_QUEUE, 3, &[(addr, too_long, 0)]);
        drv.publish(TX_QUEUE, 4, &[(addr, 100, WRITE)]);
        // Outside guest memory, and a chain that loops.
        drv.publish(TX_QUEUE, 5, &[(8 << 20, 100, 0)]);
        drv.publish(TX_QUEUE, 6, &[(addr, 100, NEXT)]);
        assert!(net.process_queue(TX_QUEUE, &mut drv.queues, &drv.mem));
        let used = drv.used(TX_QUEUE);
        assert_eq!(used.len(), 7, "{used:?}");
        assert!(host.recv(&mut [0u8; 64]).is_err(), "a frame got through");

        let parse = |descs: &[(u64, u32, u16)]| {
            let chain = descs
                .iter()
                .enumerate()
                .map(|(i, &(a, l, f))| Descriptor::new(a, l, f, u16::try_from(i + 1).unwrap()));
            TxFrame::parse(chain, &drv.mem)
        };
        drv.mem
            .write_slice(&frame(1, 0, 0, 60), GuestAddress(addr))
            .unwrap();
        assert_eq!(
            parse(&[(addr, 72, 0)]),
            Err(FrameError::Offload {
                flags: 1,
                gso_type: 0
            })
        );
        assert_eq!(parse(&[(addr, 25, 0)]), Err(FrameError::TooShort(25)));
        assert_eq!(
            parse(&[(addr, 60000, NEXT), (addr, 60000, 0)]),
            Err(FrameError::TooLong(120_000))
        );
        assert_eq!(parse(&[(addr, 72, WRITE)]), Err(FrameError::WritableTx));
        assert_eq!(
            parse(&[(addr, 72, NEXT)]),
            Err(FrameError::Descriptors(DescriptorError::Truncated))
        );
    }

    #[test]
    fn tx_work_past_the_budget_goes_to_the_event_loop() {
        let (mut net, host) = device(None);
        let mut drv = Driver::new();
        let total = FRAMES_PER_TURN + 36;
        for slot in 0..u16::try_from(total).unwrap() {
            drv.send(slot, &frame(0, 0, 0, 60));
        }
        let mut buf = [0u8; 256];
        let mut count = || std::iter::from_fn(|| host.recv(&mut buf).ok()).count();
        assert!(net.process_queue(TX_QUEUE, &mut drv.queues, &drv.mem));
        assert_eq!(count(), FRAMES_PER_TURN, "one budget on the vCPU");
        assert_eq!(kicks(&net), 1, "the rest is handed to the event loop");
        assert!(net.process_host(&mut drv.queues, &drv.mem));
        assert_eq!(count(), total - FRAMES_PER_TURN);
        assert_eq!(kicks(&net), 0, "and nothing is left");
        assert_eq!(drv.used(TX_QUEUE).len(), total);
    }

    #[test]
    fn rx_fills_guest_buffers_and_stalls_without_them() {
        let (mut net, host) = device(Some(MacAddr([6, 0, 0, 0, 0, 1])));
        let mut drv = Driver::new();
        net.activate(net.features());
        assert_eq!(kicks(&net), 1, "activation wakes the event loop");
        // No buffers: the device stalls, and a notify with buffers kicks the event loop.
        host.send(&frame(0, 0, 0x10, 60)).unwrap();
        assert!(!net.process_host(&mut drv.queues, &drv.mem));
        assert!(net.rx_stalled);
        for slot in 0..3 {
            drv.give_rx(slot, 1526);
        }
        assert!(!net.process_queue(RX_QUEUE, &mut drv.queues, &drv.mem));
        assert_eq!(kicks(&net), 1, "the stalled RX woke the event loop");

        host.send(&frame(0, 0, 0x20, 1514)).unwrap();
        assert!(net.process_host(&mut drv.queues, &drv.mem));
        assert!(!net.rx_stalled, "a buffer is left, the tap is empty");
        let used = drv.used(RX_QUEUE);
        assert_eq!(used, [(0, 72), (1, 1526)]);
        let first = drv.read(buffer(RX_QUEUE, 0), 72);
        let hdr = NetHeader::read(&first).unwrap();
        assert_eq!(hdr, NetHeader::RX);
        assert_eq!(
            first[2..10],
            [0; 8],
            "the tap's other header fields are cleared"
        );
        assert_eq!(first[NET_HDR_LEN..], frame(0, 0, 0x10, 60)[NET_HDR_LEN..]);
        let second = drv.read(buffer(RX_QUEUE, 1), 1526);
        assert_eq!(
            second[NET_HDR_LEN..],
            frame(0, 0, 0x20, 1514)[NET_HDR_LEN..]
        );

        // While RX is not stalled, a notify does not kick.
        drv.give_rx(3, 1526);
        net.process_queue(RX_QUEUE, &mut drv.queues, &drv.mem);
        assert_eq!(kicks(&net), 0);
    }

    #[test]
    fn a_frame_too_big_for_the_buffer_is_dropped_and_the_buffer_kept() {
        let (mut net, host) = device(None);
        let mut drv = Driver::new();
        drv.give_rx(0, 100);
        host.send(&frame(0, 0, 1, 200)).unwrap();
        host.send(&frame(0, 0, 2, 50)).unwrap();
        assert!(net.process_host(&mut drv.queues, &drv.mem));
        assert_eq!(drv.used(RX_QUEUE), [(0, 62)]);
        assert_eq!(
            drv.read(buffer(RX_QUEUE, 0), 62)[NET_HDR_LEN..],
            frame(0, 0, 2, 50)[NET_HDR_LEN..]
        );
    }

    #[test]
    fn rx_scatters_over_descriptors_and_refuses_bad_buffers() {
        let (mut net, host) = device(None);
        let mut drv = Driver::new();
        let a = buffer(RX_QUEUE, 0);
        // A readable descriptor, a buffer with no room for the header, then a good one in
        // three pieces.
        drv.publish(RX_QUEUE, 0, &[(a, 1526, 0)]);
        drv.publish(RX_QUEUE, 1, &[(a, 8, WRITE)]);
        drv.publish(
            RX_QUEUE,
            2,
            &[
                (a, 10, WRITE | NEXT),
                (a + 0x100, 20, WRITE | NEXT),
                (a + 0x200, 100, WRITE),
            ],
        );
        host.send(&frame(0, 0, 7, 100)).unwrap();
        assert!(net.process_host(&mut drv.queues, &drv.mem));
        assert_eq!(drv.used(RX_QUEUE), [(0, 0), (1, 0), (2, 112)]);
        let mut got = drv.read(a, 10);
        got.extend(drv.read(a + 0x100, 20));
        got.extend(drv.read(a + 0x200, 82));
        let mut want = frame(0, 0, 7, 100);
        NetHeader::RX.write(&mut want);
        assert_eq!(got, want);

        let parse = |descs: &[(u64, u32, u16)]| {
            let chain = descs
                .iter()
                .enumerate()
                .map(|(i, &(a, l, f))| Descriptor::new(a, l, f, u16::try_from(i + 1).unwrap()));
            RxBuffer::parse(chain, &drv.mem)
        };
        assert_eq!(parse(&[(a, 100, 0)]), Err(FrameError::ReadableRx));
        assert_eq!(parse(&[(a, 11, WRITE)]), Err(FrameError::NoRoom(11)));
        assert_eq!(
            parse(&[(u64::MAX - 8, 100, WRITE)]),
            Err(FrameError::Descriptors(DescriptorError::OutOfRange {
                addr: u64::MAX - 8,
                len: 100
            }))
        );
        let buffer = parse(&[(a, 100, WRITE)]).unwrap();
        // A frame from the host that asks for offloads is refused too.
        assert_eq!(
            buffer.write_frame(&mut frame(0, 3, 0, 60), &drv.mem),
            Err(FrameError::Offload {
                flags: 0,
                gso_type: 3
            })
        );
        assert_eq!(
            buffer.write_frame(&mut [0u8; 20], &drv.mem),
            Err(FrameError::TooShort(20))
        );
    }

    #[test]
    fn rx_moves_at_most_a_budget_per_turn() {
        let (mut net, host) = device(None);
        let mut drv = Driver::new();
        for slot in 0..SIZE {
            drv.give_rx(slot, 100);
        }
        for i in 0..SIZE {
            host.send(&frame(0, 0, u8::try_from(i).unwrap(), 60))
                .unwrap();
        }
        assert!(net.process_host(&mut drv.queues, &drv.mem));
        assert_eq!(drv.used(RX_QUEUE).len(), FRAMES_PER_TURN);
        assert!(
            !net.rx_stalled,
            "buffers and frames are left: the tap stays watched"
        );
        assert!(net.process_host(&mut drv.queues, &drv.mem));
        assert_eq!(
            drv.used(RX_QUEUE).len(),
            usize::from(SIZE) - FRAMES_PER_TURN
        );
    }

    #[test]
    fn the_state_names_the_tap_and_the_mac() {
        let mac = MacAddr([6, 0, 0, 0, 0, 9]);
        let (net, _) = device(Some(mac));
        let state = net.state();
        assert_eq!(
            state,
            NetState {
                iface_id: "eth0".into(),
                host_dev_name: "test0".into(),
                guest_mac: Some(mac)
            }
        );
        let json = serde_json::to_string(&state).unwrap();
        assert!(
            json.contains(r#""guest_mac":"06:00:00:00:00:09""#),
            "{json}"
        );
    }

    #[test]
    fn a_tap_name_the_kernel_cannot_take_is_refused() {
        for name in ["", "a-name-of-16-byte", "nul\0"] {
            let e = Tap::open(name).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{name:?}: {e}");
        }
    }
}
