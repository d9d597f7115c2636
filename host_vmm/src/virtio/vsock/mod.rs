//! virtio-vsock with Firecracker's hybrid Unix-socket backend ([`muxer`]).
//!
//! Queues: 0 = RX (device → driver), 1 = TX (driver → device), 2 = event (a transport reset
//! when a snapshot is taken: the guest drops its connections, which no restored VMM has).
//! Guest TX packets are handled on the vCPU that notified; host socket activity is handled
//! on the VMM's event loop through [`VsockEvents`].

pub mod muxer;
pub mod packet;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

use self::muxer::Muxer;
use self::packet::{Header, HEADER_LEN};
use super::mmio::MmioTransport;
use super::{read_config_bytes, GuestWarnings, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemory;

/// virtio device id of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, the only event of virtio-vsock.
const EVENT_TRANSPORT_RESET: u32 = 0;
const QUEUE_SIZE: u16 = 256;
/// Largest payload accepted from the guest in one packet.
const MAX_TX_PAYLOAD: u32 = 64 * 1024;

/// The vsock device.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    warnings: GuestWarnings,
}

impl Vsock {
    /// A device for guest CID `guest_cid` whose host side lives at `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> std::io::Result<Self> {
        if guest_cid <= 2 || guest_cid > u64::from(u32::MAX) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("guest_cid {guest_cid} is reserved or out of range (use 3..=2^32-1)"),
            ));
        }
        Ok(Self {
            guest_cid,
            muxer: Muxer::new(uds_path, guest_cid)?,
            warnings: GuestWarnings::default(),
        })
    }

    /// What a snapshot needs to rebuild the device.
    pub fn state(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
            uds_path: self.muxer.uds_path().to_path_buf(),
        }
    }

    /// Tells the driver that the transport was reset (the event of that name). Returns
    /// whether an event buffer was used.
    fn send_transport_reset(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            tracing::warn!("vsock: no event buffer for the transport reset");
            return false;
        };
        let head = chain.head_index();
        let written = match chain.writer(mem) {
            Ok(mut w) => w.write_obj(EVENT_TRANSPORT_RESET.to_le()).map(|()| 4),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        let len = written.unwrap_or_else(|e| {
            tracing::warn!("vsock: writing the transport reset event: {e}");
            0
        });
        if let Err(e) = queue.add_used(mem, head, len) {
            tracing::warn!("vsock event queue: {e}");
        }
        true
    }

    /// Host-side work: new clients, CONNECT lines, readable sockets.
    pub fn handle_host_events(&mut self) {
        self.muxer.handle_events();
    }

    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match read_packet(chain, mem) {
                Ok((hdr, payload)) => self.muxer.send_to_host(&hdr, &payload),
                Err(e) => {
                    self.warnings
                        .warn(format_args!("vsock: dropped a malformed TX packet: {e}"));
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::warn!("vsock TX queue: {e}");
                break;
            }
            used = true;
        }
        used
    }

    fn fill_rx(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        while self.muxer.has_pending_rx() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(mem) {
                Ok(w) if w.available_bytes() >= HEADER_LEN => w,
                Ok(_) | Err(_) => {
                    self.warnings
                        .warn(format_args!("vsock: unusable RX buffer dropped"));
                    let _ = queue.add_used(mem, head, 0);
                    used = true;
                    continue;
                }
            };
            let Some((hdr, payload)) = self.muxer.next_rx(writer.available_bytes() - HEADER_LEN)
            else {
                queue.go_to_previous_position();
                break;
            };
            let len = match write_packet(&mut writer, hdr, &payload) {
                Ok(len) => len,
                Err(e) => {
                    tracing::warn!("vsock: writing an RX packet: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("vsock RX queue: {e}");
                break;
            }
            used = true;
        }
        used
    }
}

/// Writes `hdr`, its `len` set to the payload's, and `payload` into an RX buffer; returns the
/// length the used ring reports.
fn write_packet(
    writer: &mut virtio_queue::Writer<'_>,
    mut hdr: Header,
    payload: &[u8],
) -> std::io::Result<u32> {
    // The muxer hands out at most a packet's payload, far below 4 GiB.
    let too_long = |_| std::io::Error::other(format!("a payload of {} bytes", payload.len()));
    hdr.len = u32::try_from(payload.len()).map_err(too_long)?;
    let used = u32::try_from(HEADER_LEN + payload.len()).map_err(too_long)?;
    writer.write_obj(hdr)?;
    std::io::Write::write_all(writer, payload)?;
    Ok(used)
}

/// Reads one guest packet: the header, then exactly `len` payload bytes.
fn read_packet(
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
) -> Result<(Header, Vec<u8>), String> {
    let mut reader = chain.reader(mem).map_err(|e| e.to_string())?;
    let hdr: Header = reader.read_obj().map_err(|e| format!("header: {e}"))?;
    let len = hdr.len;
    if len > MAX_TX_PAYLOAD {
        return Err(format!("payload of {len} bytes exceeds {MAX_TX_PAYLOAD}"));
    }
    let mut payload = vec![0u8; len as usize];
    reader
        .read_exact(&mut payload)
        .map_err(|e| format!("payload: {e}"))?;
    Ok((hdr, payload))
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let tx_used = index == TX_QUEUE && self.process_tx(&mut queues[TX_QUEUE], mem);
        // Anything the guest just sent may have produced replies; new RX buffers may unblock
        // waiting data.
        let rx_used = self.fill_rx(&mut queues[RX_QUEUE], mem);
        tx_used || rx_used
    }

    /// Ends every connection, so that a guest restored from this moment has none that its
    /// VMM does not have: their host sides close, and the guest hears it twice. An RST per
    /// connection, written into its RX buffers now, is what wakes a program waiting to read
    /// (Linux's transport reset alone makes a socket report only an error and
    /// writability, which a reader such as tokio's never sees); the transport-reset event
    /// follows, as Firecracker sends it.
    fn prepare_snapshot(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        self.muxer.reset_all();
        let rst_used = self.fill_rx(&mut queues[RX_QUEUE], mem);
        let event_used = self.send_transport_reset(&mut queues[EVENT_QUEUE], mem);
        rst_used || event_used
    }
}

/// A vsock device in a snapshot: its CID and where its host side listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// The event-loop side of a vsock device: wakes on host socket activity.
#[derive(Debug)]
pub struct VsockEvents(pub Arc<Mutex<MmioTransport<Vsock>>>);

impl MutEventSubscriber for VsockEvents {
    fn init(&mut self, ops: &mut EventOps) {
        let fd = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device_mut()
            .muxer
            .epoll_fd();
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            tracing::error!("vsock: cannot watch host sockets: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut transport = self.0.lock().unwrap_or_else(|e| e.into_inner());
        transport.device_mut().handle_host_events();
        transport.process_queue(RX_QUEUE);
    }
}

#[cfg(test)]
mod tests {
    use super::packet::*;
    use super::*;
    use crate::memory::create_guest_memory;
    use crate::virtio::test_rings::{queues, ring};
    use std::io::Write;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use vm_memory::{Bytes, GuestAddress};

    const SIZE: u16 = 16;
    const GUEST_CID: u64 = 3;

    /// The guest driver's side of the three queues, in real guest memory.
    struct Driver {
        mem: GuestMemory,
        queues: Vec<Queue>,
        avail: [u16; 2],
        rx_seen: u16,
    }

    impl Driver {
        fn new() -> Self {
            Self {
                mem: create_guest_memory(1).unwrap(),
                queues: queues(3, SIZE),
                avail: [0; 2],
                rx_seen: 0,
            }
        }

        fn publish(&mut self, q: usize, addr: u64, len: u32, flags: u16) {
            let (d, a, _) = ring(q);
            let idx = self.avail[q];
            let slot = idx % SIZE;
            let desc = virtio_queue::desc::split::Descriptor::new(addr, len, flags, 0);
            self.mem
                .write_obj(desc, GuestAddress(d + 16 * u64::from(slot)))
                .unwrap();
            self.mem
                .write_obj(slot, GuestAddress(a + 4 + 2 * u64::from(slot)))
                .unwrap();
            self.avail[q] = idx.wrapping_add(1);
            self.mem
                .write_obj(self.avail[q], GuestAddress(a + 2))
                .unwrap();
        }

        fn give_rx(&mut self, dev: &mut Vsock, n: u16) {
            for _ in 0..n {
                let slot = self.avail[RX_QUEUE] % SIZE;
                self.publish(RX_QUEUE, 0x20000 + u64::from(slot) * 0x1000, 0x1000, 2);
            }
            dev.process_queue(RX_QUEUE, &mut self.queues, &self.mem);
        }

        fn send(&mut self, dev: &mut Vsock, mut hdr: Header, payload: &[u8]) {
            hdr.src_cid = GUEST_CID;
            hdr.dst_cid = HOST_CID;
            hdr.type_ = TYPE_STREAM;
            hdr.len = u32::try_from(payload.len()).unwrap();
            let addr = 0x40000 + u64::from(self.avail[TX_QUEUE] % SIZE) * 0x1000;
            self.mem.write_obj(hdr, GuestAddress(addr)).unwrap();
            self.mem
                .write_slice(payload, GuestAddress(addr + HEADER_LEN as u64))
                .unwrap();
            let len = u32::try_from(HEADER_LEN + payload.len()).unwrap();
            self.publish(TX_QUEUE, addr, len, 0);
            dev.process_queue(TX_QUEUE, &mut self.queues, &self.mem);
        }

        /// Packets the device put in RX buffers since the last call.
        fn recv(&mut self, dev: &mut Vsock) -> Vec<(Header, Vec<u8>)> {
            dev.handle_host_events();
            dev.process_queue(RX_QUEUE, &mut self.queues, &self.mem);
            let (_, _, u) = ring(RX_QUEUE);
            let used: u16 = self.mem.read_obj(GuestAddress(u + 2)).unwrap();
            let mut out = Vec::new();
            while self.rx_seen != used {
                let e = u + 4 + 8 * u64::from(self.rx_seen % SIZE);
                let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
                let addr = 0x20000 + u64::from(id) * 0x1000;
                let hdr: Header = self.mem.read_obj(GuestAddress(addr)).unwrap();
                let mut data = vec![0u8; len as usize - HEADER_LEN];
                self.mem
                    .read_slice(&mut data, GuestAddress(addr + HEADER_LEN as u64))
                    .unwrap();
                out.push((hdr, data));
                self.rx_seen = self.rx_seen.wrapping_add(1);
            }
            out
        }
    }

    fn header(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            op,
            src_port,
            dst_port,
            buf_alloc: 1 << 16,
            ..Default::default()
        }
    }

    fn uds(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("kv-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn ops(pkts: &[(Header, Vec<u8>)]) -> Vec<u16> {
        pkts.iter().map(|(h, _)| h.op).collect()
    }

    #[test]
    fn guest_initiated_stream_to_a_host_unix_socket() {
        let path = uds("g2h");
        let listener = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
        let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
        let mut drv = Driver::new();
        drv.give_rx(&mut dev, 8);

        drv.send(&mut dev, header(OP_REQUEST, 1234, 5000), &[]);
        let got = drv.recv(&mut dev);
        assert_eq!(ops(&got), [OP_RESPONSE]);
        let h = got[0].0;
        assert_eq!(
            (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
            (2, 3, 5000, 1234)
        );

        let (mut host, _) = listener.accept().unwrap();
        drv.send(&mut dev, header(OP_RW, 1234, 5000), b"ping");
        let mut buf = [0u8; 4];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");

        host.write_all(b"pong").unwrap();
        let got = drv.recv(&mut dev);
        assert_eq!(ops(&got), [OP_RW]);
        assert_eq!(got[0].1, b"pong");
        assert_eq!(
            { got[0].0.fwd_cnt },
            4,
            "our fwd_cnt counts what reached the host"
        );

        drop(host);
        let got = drv.recv(&mut dev);
        assert_eq!(ops(&got), [OP_SHUTDOWN]);
        drv.send(&mut dev, header(OP_RST, 1234, 5000), &[]);
        drop(dev);
        assert!(!path.exists(), "the socket is unlinked on drop");
        std::fs::remove_file(format!("{}_5000", path.display())).unwrap();
    }

    #[test]
    fn guest_connect_to_a_port_nobody_listens_on_is_reset() {
        let path = uds("refused");
        let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
        let mut drv = Driver::new();
        drv.give_rx(&mut dev, 2);
        drv.send(&mut dev, header(OP_REQUEST, 1, 7777), &[]);
        assert_eq!(ops(&drv.recv(&mut dev)), [OP_RST]);
        // Data for a connection that does not exist is answered with RST too.
        drv.send(&mut dev, header(OP_RW, 1, 7777), b"x");
        assert_eq!(ops(&drv.recv(&mut dev)), [OP_RST]);
    }

    #[test]
    fn host_initiated_connect_ok_and_data() {
        let path = uds("h2g");
        let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
        let mut drv = Driver::new();
        drv.give_rx(&mut dev, 8);

        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 52\n").unwrap();
        let got = drv.recv(&mut dev);
        assert_eq!(ops(&got), [OP_REQUEST]);
        let req = got[0].0;
        assert_eq!((req.dst_port, req.dst_cid), (52, GUEST_CID));
        let host_port = req.src_port;

        drv.send(&mut dev, header(OP_RESPONSE, 52, host_port), &[]);
        let mut line = [0u8; 64];
        let n = client.read(&mut line).unwrap();
        assert_eq!(
            std::str::from_utf8(&line[..n]).unwrap(),
            format!("OK {host_port}\n")
        );

        client.write_all(b"hello guest").unwrap();
        let got = drv.recv(&mut dev);
        assert_eq!(ops(&got), [OP_RW]);
        assert_eq!(got[0].1, b"hello guest");
        drv.send(&mut dev, header(OP_RW, 52, host_port), b"hello host");
        let n = client.read(&mut line).unwrap();
        assert_eq!(&line[..n], b"hello host");
    }

    #[test]
    fn host_connect_refused_by_the_guest_or_malformed_is_closed() {
        let path = uds("h2g-refused");
        let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
        let mut drv = Driver::new();
        drv.give_rx(&mut dev, 8);

        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 99\n").unwrap();
        let req = drv.recv(&mut dev)[0].0;
        drv.send(&mut dev, header(OP_RST, 99, req.src_port), &[]);
        let mut buf = [0u8; 8];
        assert_eq!(client.read(&mut buf).unwrap(), 0, "closed without OK");

        let mut bad = UnixStream::connect(&path).unwrap();
        bad.write_all(b"HELLO 1\n").unwrap();
        assert!(drv.recv(&mut dev).is_empty(), "no REQUEST for a bad line");
        assert_eq!(bad.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn guest_credit_bounds_what_the_host_may_send() {
        let path = uds("credit");
        let listener = UnixListener::bind(format!("{}_6000", path.display())).unwrap();
        let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
        let mut drv = Driver::new();
        drv.give_rx(&mut dev, 8);
        let mut req = header(OP_REQUEST, 10, 6000);
        req.buf_alloc = 4;
        drv.send(&mut dev, req, &[]);
        assert_eq!(ops(&drv.recv(&mut dev)), [OP_RESPONSE]);
        let (mut host, _) = listener.accept().unwrap();

        host.write_all(b"abcdefgh").unwrap();
        let got = drv.recv(&mut dev);
        assert_eq!(
            got.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>(),
            [b"abcd".to_vec()]
        );
        assert!(drv.recv(&mut dev).is_empty(), "no credit left");

        let mut update = header(OP_CREDIT_UPDATE, 10, 6000);
        update.buf_alloc = 4;
        update.fwd_cnt = 4;
        drv.send(&mut dev, update, &[]);
        let got = drv.recv(&mut dev);
        assert_eq!(
            got.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>(),
            [b"efgh".to_vec()]
        );

        drv.send(&mut dev, header(OP_CREDIT_REQUEST, 10, 6000), &[]);
        let got = drv.recv(&mut dev);
        assert_eq!(ops(&got), [OP_CREDIT_UPDATE]);
        assert_eq!({ got[0].0.buf_alloc }, muxer::BUF_ALLOC);
        std::fs::remove_file(format!("{}_6000", path.display())).unwrap();
    }

    #[test]
    fn many_connections_at_once_keep_their_data_apart() {
        let path = uds("many");
        let listener = UnixListener::bind(format!("{}_7000", path.display())).unwrap();
        let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
        let mut drv = Driver::new();
        drv.give_rx(&mut dev, 8);
        let mut hosts = Vec::new();
        for guest_port in 100..140u32 {
            drv.send(&mut dev, header(OP_REQUEST, guest_port, 7000), &[]);
            assert_eq!(ops(&drv.recv(&mut dev)), [OP_RESPONSE]);
            drv.give_rx(&mut dev, 1);
            let (host, _) = listener.accept().unwrap();
            hosts.push((guest_port, host));
        }
        for (guest_port, _) in &hosts {
            drv.send(
                &mut dev,
                header(OP_RW, *guest_port, 7000),
                &guest_port.to_le_bytes(),
            );
        }
        for (guest_port, host) in &mut hosts {
            let mut buf = [0u8; 4];
            host.read_exact(&mut buf).unwrap();
            assert_eq!(u32::from_le_bytes(buf), *guest_port);
            host.write_all(format!("to {guest_port}").as_bytes())
                .unwrap();
        }
        let mut seen = 0;
        while seen < hosts.len() {
            drv.give_rx(&mut dev, 4);
            for (h, data) in drv.recv(&mut dev) {
                assert_eq!({ h.op }, OP_RW);
                assert_eq!(
                    String::from_utf8(data).unwrap(),
                    format!("to {}", { h.dst_port })
                );
                seen += 1;
            }
        }
        std::fs::remove_file(format!("{}_7000", path.display())).unwrap();
    }

    #[test]
    fn connections_past_the_limit_are_refused_until_one_closes() {
        let path = uds("limit");
        let listener = UnixListener::bind(format!("{}_7100", path.display())).unwrap();
        let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
        dev.muxer.max_connections = 4;
        let mut drv = Driver::new();
        let mut answers = Vec::new();
        for guest_port in 200..206u32 {
            drv.give_rx(&mut dev, 1);
            drv.send(&mut dev, header(OP_REQUEST, guest_port, 7100), &[]);
            answers.extend(ops(&drv.recv(&mut dev)));
        }
        let accepted = [OP_RESPONSE; 4];
        assert_eq!(answers, [&accepted[..], &[OP_RST, OP_RST]].concat());

        // A host client past the limit is closed instead of reaching the guest.
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 52\n").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        drv.give_rx(&mut dev, 1);
        for _ in 0..3 {
            assert!(drv.recv(&mut dev).is_empty(), "nothing for the guest");
        }
        assert_eq!(client.read(&mut [0u8; 1]).unwrap(), 0, "closed");

        // Once the guest closes one, a new connection gets through.
        drv.send(&mut dev, header(OP_RST, 200, 7100), &[]);
        drv.send(&mut dev, header(OP_REQUEST, 300, 7100), &[]);
        assert_eq!(ops(&drv.recv(&mut dev)), [OP_RESPONSE]);
        drop(listener);
        std::fs::remove_file(format!("{}_7100", path.display())).unwrap();
    }

    #[test]
    fn a_guest_that_takes_no_packets_cannot_grow_the_control_queue() {
        let path = uds("flood");
        let listener = UnixListener::bind(format!("{}_7200", path.display())).unwrap();
        let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
        let mut drv = Driver::new();
        drv.give_rx(&mut dev, 1);
        drv.send(&mut dev, header(OP_REQUEST, 1, 7200), &[]);
        assert_eq!(ops(&drv.recv(&mut dev)), [OP_RESPONSE]);
        // Credit requests on one connection leave one credit update, the newest.
        for _ in 0..100 {
            drv.send(&mut dev, header(OP_CREDIT_REQUEST, 1, 7200), &[]);
        }
        assert_eq!(dev.muxer.pending_control(), 1);
        // Stray packets, each answered with RST, stop at the bound.
        let flood = u32::try_from(muxer::MAX_PENDING_CONTROL).unwrap() + 100;
        for port in 1000..1000 + flood {
            drv.send(&mut dev, header(OP_RW, port, 9), b"x");
        }
        assert_eq!(dev.muxer.pending_control(), muxer::MAX_PENDING_CONTROL);
        drop(listener);
        std::fs::remove_file(format!("{}_7200", path.display())).unwrap();
    }

    #[test]
    fn bad_configuration_is_refused() {
        assert!(Vsock::new(2, &uds("cid2")).is_err());
        let path = uds("twice");
        let _first = Vsock::new(3, &path).unwrap();
        let err = Vsock::new(3, &path).expect_err("a second bind fails");
        assert!(err.to_string().contains("binding vsock socket"), "{err}");
    }
}
