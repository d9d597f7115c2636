//! virtio-blk backed by a file: read-only or read-write, flush honoured (virtio 1.2 §5.2).
//!
//! A request is one descriptor chain: a 16-byte header the driver wrote, data buffers, and a
//! one-byte status the device writes. [`Request::parse`] checks the whole chain against guest
//! memory before any I/O, so a hostile chain (loop, out-of-range buffer, wrong direction,
//! zero length, too many descriptors) is rejected without touching the file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::{
    checked_descriptors, read_config_bytes, DescriptorError, GuestWarnings, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemory;

/// virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const HEADER_LEN: u32 = 16;
/// Most data bytes one request may carry: the used ring reports them, plus the status byte,
/// as a `u32`.
const MAX_DATA_LEN: u32 = u32::MAX - 1;

/// The status byte the device writes; virtio-bindings defines the values as `u32`. Only
/// evaluated in constants, so a value that does not fit a byte fails the build.
const fn status_byte(status: u32) -> u8 {
    match status.to_le_bytes() {
        [byte, 0, 0, 0] => byte,
        _ => panic!("a virtio-blk status does not fit a byte"),
    }
}
const S_OK: u8 = status_byte(VIRTIO_BLK_S_OK);
const S_IOERR: u8 = status_byte(VIRTIO_BLK_S_IOERR);
const S_UNSUPP: u8 = status_byte(VIRTIO_BLK_S_UNSUPP);

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

/// Why a descriptor chain is not a valid block request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Descriptors(#[from] DescriptorError),
    #[error("request header is short or device-writable")]
    BadHeader,
    #[error("status descriptor missing, empty or not device-writable")]
    BadStatus,
    #[error("data descriptor of zero length")]
    ZeroLength,
    #[error("data descriptor has the wrong direction for the request")]
    WrongDirection,
    #[error("data descriptors of {0} bytes in all: more than a request may carry")]
    TooLong(u64),
}

/// A parsed, memory-checked block request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// Data buffers in order: (guest address, length).
    pub data: Vec<(GuestAddress, u32)>,
    pub status: GuestAddress,
}

impl Request {
    /// Parses the descriptors of one chain (as yielded by virtio-queue).
    pub fn parse(
        descriptors: impl Iterator<Item = Descriptor>,
        mem: &GuestMemory,
    ) -> Result<Self, ChainError> {
        let descs = checked_descriptors(descriptors, mem)?;
        let (header, rest) = descs
            .split_first()
            .ok_or(DescriptorError::Empty)
            .map_err(ChainError::from)?;
        if header.is_write_only() || header.len() < HEADER_LEN {
            return Err(ChainError::BadHeader);
        }
        let kind = match mem
            .read_obj::<u32>(header.addr())
            .map_err(|_| ChainError::BadHeader)?
        {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        };
        let sector = mem
            .read_obj::<u64>(header.addr().unchecked_add(8))
            .map_err(|_| ChainError::BadHeader)?;
        let (status, data) = rest.split_last().ok_or(ChainError::BadStatus)?;
        if !status.is_write_only() || status.len() == 0 {
            return Err(ChainError::BadStatus);
        }
        // Which way data flows; other requests carry no data the device looks at.
        let device_writes = match kind {
            RequestType::In | RequestType::GetId => Some(true),
            RequestType::Out => Some(false),
            RequestType::Flush | RequestType::Unsupported(_) => None,
        };
        for d in data {
            if d.len() == 0 {
                return Err(ChainError::ZeroLength);
            }
            if device_writes.is_some_and(|w| w != d.is_write_only()) {
                return Err(ChainError::WrongDirection);
            }
        }
        // At most a queue's worth of u32 lengths: the sum cannot overflow a u64.
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        if total > u64::from(MAX_DATA_LEN) {
            return Err(ChainError::TooLong(total));
        }
        Ok(Self {
            kind,
            sector,
            data: data.iter().map(|d| (d.addr(), d.len())).collect(),
            status: status.addr(),
        })
    }

    fn data_len(&self) -> u64 {
        self.data.iter().map(|(_, len)| u64::from(*len)).sum()
    }
}

/// A block device backed by a file.
#[derive(Debug)]
pub struct Block {
    file: File,
    path: PathBuf,
    drive_id: String,
    read_only: bool,
    /// Size in bytes, rounded down to whole sectors.
    size: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    warnings: GuestWarnings,
}

impl Block {
    /// Opens `path`; `id` is what the guest reads as the serial (truncated to 20 bytes).
    pub fn open(path: &Path, read_only: bool, id: &str) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file.metadata()?.len() / SECTOR_SIZE * SECTOR_SIZE;
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = id.len().min(id_bytes.len());
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            file,
            path: path.to_path_buf(),
            drive_id: id.to_owned(),
            read_only,
            size,
            id: id_bytes,
            warnings: GuestWarnings::default(),
        })
    }

    /// What a snapshot needs to open the drive again.
    pub fn state(&self) -> BlockState {
        BlockState {
            drive_id: self.drive_id.clone(),
            path_on_host: self.path.clone(),
            is_read_only: self.read_only,
            size: self.size,
        }
    }

    /// Opens the drive a snapshot names; refused if its size changed, since the guest
    /// already read the old capacity.
    pub fn from_state(state: &BlockState) -> io::Result<Self> {
        let block = Self::open(&state.path_on_host, state.is_read_only, &state.drive_id)?;
        if block.size != state.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "drive {}: {} is {} bytes, the snapshot's guest saw {}",
                    state.drive_id,
                    state.path_on_host.display(),
                    block.size,
                    state.size
                ),
            ));
        }
        Ok(block)
    }

    /// Runs one request; returns the status byte and how many bytes went to the guest.
    pub fn execute(&mut self, req: &Request, mem: &GuestMemory) -> (u8, u32) {
        match self.try_execute(req, mem) {
            Ok(written) => (S_OK, written),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => (S_UNSUPP, 0),
            Err(e) => {
                tracing::debug!("block request {:?} failed: {e}", req.kind);
                (S_IOERR, 0)
            }
        }
    }

    fn try_execute(&mut self, req: &Request, mem: &GuestMemory) -> io::Result<u32> {
        let mem_err = |e: vm_memory::GuestMemoryError| io::Error::other(e.to_string());
        match req.kind {
            RequestType::In | RequestType::Out => {
                // `parse` already refuses longer requests; a hand-made one gets the same answer.
                let len = u32::try_from(req.data_len())
                    .ok()
                    .filter(|&len| len <= MAX_DATA_LEN)
                    .ok_or_else(|| io::Error::other("request longer than a used length"))?;
                let start = req
                    .sector
                    .checked_mul(SECTOR_SIZE)
                    .filter(|s| {
                        s.checked_add(req.data_len())
                            .is_some_and(|e| e <= self.size)
                    })
                    .ok_or_else(|| io::Error::other("request beyond the end of the disk"))?;
                if req.kind == RequestType::Out && self.read_only {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "read-only drive",
                    ));
                }
                let mut offset = start;
                for &(addr, len) in &req.data {
                    let mut buf = vec![0u8; len as usize];
                    if req.kind == RequestType::In {
                        self.file.read_exact_at(&mut buf, offset)?;
                        mem.write_slice(&buf, addr).map_err(mem_err)?;
                    } else {
                        mem.read_slice(&mut buf, addr).map_err(mem_err)?;
                        self.file.write_all_at(&buf, offset)?;
                    }
                    offset += u64::from(len);
                }
                Ok(if req.kind == RequestType::In { len } else { 0 })
            }
            RequestType::Flush => {
                if !self.read_only {
                    self.file.sync_all()?;
                }
                Ok(0)
            }
            RequestType::GetId => {
                let (addr, len) = *req
                    .data
                    .first()
                    .ok_or_else(|| io::Error::other("GET_ID without a buffer"))?;
                let n = len.min(VIRTIO_BLK_ID_BYTES);
                mem.write_slice(&self.id[..n as usize], addr)
                    .map_err(mem_err)?;
                Ok(n)
            }
            RequestType::Unsupported(t) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("request type {t}"),
            )),
        }
    }
}

/// A drive in a snapshot: the file is opened again by path, its contents are the user's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub drive_id: String,
    pub path_on_host: PathBuf,
    pub is_read_only: bool,
    /// Bytes, whole sectors.
    pub size: u64,
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only {
            1 << VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_FLUSH) | ro
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Only `capacity` (in sectors) is offered.
        read_config_bytes(&(self.size / SECTOR_SIZE).to_le_bytes(), offset, data);
    }

    fn process_queue(&mut self, _index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let queue = &mut queues[0];
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = match Request::parse(chain, mem) {
                Ok(req) => {
                    let (status, written) = self.execute(&req, mem);
                    match mem.write_obj(status, req.status) {
                        Ok(()) => written + 1,
                        Err(e) => {
                            tracing::debug!("writing block status: {e}");
                            0
                        }
                    }
                }
                Err(e) => {
                    self.warnings
                        .warn(format_args!("rejected block request: {e}"));
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("block queue: {e}");
                break;
            }
            used = true;
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const SIZE: u16 = 16;
    const NEXT: u16 = ring_flag(VRING_DESC_F_NEXT);
    const WRITE: u16 = ring_flag(VRING_DESC_F_WRITE);

    /// A descriptor flag (`u32` in virtio-bindings) as the descriptor's `u16`.
    const fn ring_flag(flag: u32) -> u16 {
        match flag.to_le_bytes() {
            [lo, hi, 0, 0] => u16::from_le_bytes([lo, hi]),
            _ => panic!("a descriptor flag does not fit 16 bits"),
        }
    }

    fn low(addr: u64) -> Option<u32> {
        Some(u32::try_from(addr).unwrap())
    }

    /// A queue laid out in real guest memory with `descs` (addr, len, flags, next) and one
    /// available chain starting at descriptor 0.
    fn queue_with(mem: &GuestMemory, descs: &[(u64, u32, u16, u16)]) -> Queue {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = Descriptor::new(addr, len, flags, next);
            mem.write_obj(d, GuestAddress(DESC + 16 * i as u64))
                .unwrap();
        }
        mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(low(DESC), Some(0));
        q.set_avail_ring_address(low(AVAIL), Some(0));
        q.set_used_ring_address(low(USED), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    fn header(mem: &GuestMemory, addr: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(addr)).unwrap();
        mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(addr + 8)).unwrap();
    }

    /// (used idx, used len of entry 0)
    fn used(mem: &GuestMemory) -> (u16, u32) {
        (
            mem.read_obj(GuestAddress(USED + 2)).unwrap(),
            mem.read_obj(GuestAddress(USED + 8)).unwrap(),
        )
    }

    fn disk(name: &str, sectors: u8) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("kindling-blk-{}-{name}", std::process::id()));
        let sector = usize::try_from(SECTOR_SIZE).unwrap();
        let data: Vec<u8> = (0..sectors).flat_map(|s| vec![s; sector]).collect();
        std::fs::write(&path, data).unwrap();
        path
    }

    /// Runs a header/data/status request through the queue; returns the status byte.
    fn run(
        blk: &mut Block,
        mem: &GuestMemory,
        kind: u32,
        sector: u64,
        data_flags: u16,
        len: u32,
    ) -> u8 {
        header(mem, 0x10000, kind, sector);
        mem.write_obj(0xffu8, GuestAddress(0x30000)).unwrap();
        let mut q = queue_with(
            mem,
            &[
                (0x10000, 16, NEXT, 1),
                (0x20000, len, data_flags | NEXT, 2),
                (0x30000, 1, WRITE, 0),
            ],
        );
        assert!(blk.process_queue(0, std::slice::from_mut(&mut q), mem));
        mem.read_obj(GuestAddress(0x30000)).unwrap()
    }

    #[test]
    fn read_write_flush_and_read_only() {
        let mem = create_guest_memory(1).unwrap();
        let path = disk("rw", 4);
        let mut blk = Block::open(&path, false, "rootfs").unwrap();
        assert_eq!(blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 4);

        assert_eq!(run(&mut blk, &mem, VIRTIO_BLK_T_IN, 2, WRITE, 1024), S_OK);
        assert_eq!(used(&mem), (1, 1025));
        let mut buf = [0u8; 1024];
        mem.read_slice(&mut buf, GuestAddress(0x20000)).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 2) && buf[512..].iter().all(|&b| b == 3));

        mem.write_slice(&[0xab; 512], GuestAddress(0x20000))
            .unwrap();
        assert_eq!(run(&mut blk, &mem, VIRTIO_BLK_T_OUT, 1, 0, 512), S_OK);
        assert_eq!(run(&mut blk, &mem, VIRTIO_BLK_T_FLUSH, 0, 0, 1), S_OK);
        let file = std::fs::read(&path).unwrap();
        assert!(file[512..1024].iter().all(|&b| b == 0xab));

        let mut ro = Block::open(&path, true, "ro").unwrap();
        assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
        mem.write_slice(&[0xcd; 512], GuestAddress(0x20000))
            .unwrap();
        assert_eq!(run(&mut ro, &mem, VIRTIO_BLK_T_OUT, 0, 0, 512), S_IOERR);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            file,
            "a read-only drive was modified"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn out_of_range_sector_get_id_and_unsupported() {
        let mem = create_guest_memory(1).unwrap();
        let path = disk("range", 2);
        let mut blk = Block::open(&path, false, "my-drive").unwrap();
        assert_eq!(
            run(&mut blk, &mem, VIRTIO_BLK_T_IN, 1, WRITE, 1024),
            S_IOERR
        );
        assert_eq!(
            run(&mut blk, &mem, VIRTIO_BLK_T_IN, u64::MAX, WRITE, 512),
            S_IOERR
        );
        assert_eq!(run(&mut blk, &mem, VIRTIO_BLK_T_GET_ID, 0, WRITE, 20), S_OK);
        let mut id = [0u8; 8];
        mem.read_slice(&mut id, GuestAddress(0x20000)).unwrap();
        assert_eq!(&id, b"my-drive");
        assert_eq!(run(&mut blk, &mem, 99, 0, WRITE, 8), S_UNSUPP);
        std::fs::remove_file(path).unwrap();
    }

    fn parse(mem: &GuestMemory, descs: &[(u64, u32, u16, u16)]) -> Result<Request, ChainError> {
        header(mem, 0x10000, VIRTIO_BLK_T_IN, 0);
        let mut q = queue_with(mem, descs);
        let chain = q.pop_descriptor_chain(mem).expect("a chain is available");
        Request::parse(chain, mem)
    }

    #[test]
    fn hostile_chains_are_rejected() {
        let mem = create_guest_memory(1).unwrap();
        let end = 1 << 20;
        // A loop: 0 -> 1 -> 0 -> ...
        assert_eq!(
            parse(
                &mem,
                &[(0x10000, 16, NEXT, 1), (0x20000, 8, WRITE | NEXT, 0)]
            ),
            Err(DescriptorError::Truncated.into())
        );
        // `next` past the end of the table.
        assert_eq!(
            parse(&mem, &[(0x10000, 16, NEXT, 200)]),
            Err(DescriptorError::Truncated.into())
        );
        // More descriptors than the queue holds (every one says NEXT).
        let long: Vec<_> = (0..SIZE)
            .map(|i| (0x20000 + 64 * u64::from(i), 8, WRITE | NEXT, i + 1))
            .collect();
        assert_eq!(parse(&mem, &long), Err(DescriptorError::Truncated.into()));
        // A buffer beyond guest memory, and one that wraps around the address space.
        assert_eq!(
            parse(
                &mem,
                &[
                    (0x10000, 16, NEXT, 1),
                    (end - 4, 8, WRITE | NEXT, 2),
                    (0x30000, 1, WRITE, 0)
                ]
            ),
            Err(DescriptorError::OutOfRange {
                addr: end - 4,
                len: 8
            }
            .into())
        );
        assert!(matches!(
            parse(
                &mem,
                &[
                    (0x10000, 16, NEXT, 1),
                    (u64::MAX - 2, 8, WRITE | NEXT, 2),
                    (0x30000, 1, WRITE, 0)
                ]
            ),
            Err(ChainError::Descriptors(DescriptorError::OutOfRange { .. }))
        ));
        // Zero-length data, wrong direction, bad header, bad status, header only.
        assert_eq!(
            parse(
                &mem,
                &[
                    (0x10000, 16, NEXT, 1),
                    (0x20000, 0, WRITE | NEXT, 2),
                    (0x30000, 1, WRITE, 0)
                ]
            ),
            Err(ChainError::ZeroLength)
        );
        assert_eq!(
            parse(
                &mem,
                &[
                    (0x10000, 16, NEXT, 1),
                    (0x20000, 8, NEXT, 2),
                    (0x30000, 1, WRITE, 0)
                ]
            ),
            Err(ChainError::WrongDirection)
        );
        assert_eq!(
            parse(&mem, &[(0x10000, 8, NEXT, 1), (0x30000, 1, WRITE, 0)]),
            Err(ChainError::BadHeader)
        );
        assert_eq!(
            parse(
                &mem,
                &[(0x10000, 16, WRITE | NEXT, 1), (0x30000, 1, WRITE, 0)]
            ),
            Err(ChainError::BadHeader)
        );
        assert_eq!(
            parse(&mem, &[(0x10000, 16, NEXT, 1), (0x30000, 1, 0, 0)]),
            Err(ChainError::BadStatus)
        );
        assert_eq!(
            parse(&mem, &[(0x10000, 16, 0, 0)]),
            Err(ChainError::BadStatus)
        );
        // A well-formed chain still parses.
        let ok = parse(
            &mem,
            &[
                (0x10000, 16, NEXT, 1),
                (0x20000, 512, WRITE | NEXT, 2),
                (0x30000, 1, WRITE, 0),
            ],
        );
        assert_eq!(ok.unwrap().data, vec![(GuestAddress(0x20000), 512)]);
    }

    #[test]
    fn a_rejected_chain_is_returned_with_zero_length() {
        let mem = create_guest_memory(1).unwrap();
        let path = disk("reject", 1);
        let mut blk = Block::open(&path, false, "x").unwrap();
        let mut q = queue_with(
            &mem,
            &[(0x10000, 16, NEXT, 1), (0x20000, 8, WRITE | NEXT, 0)],
        );
        assert!(blk.process_queue(0, std::slice::from_mut(&mut q), &mem));
        assert_eq!(used(&mem), (1, 0));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_request_longer_than_a_used_length_is_refused() {
        // Data buffers may overlap: six 768 MiB buffers in 1 GiB of guest memory add up to
        // 4.5 GiB, which the used ring's u32 length could only report truncated.
        let mem = create_guest_memory(1024).unwrap();
        let big = 0x3000_0000;
        let mut descs = vec![(0x10000, 16, NEXT, 1)];
        descs.extend((1..=6).map(|i| (0x10_0000, big, WRITE | NEXT, i + 1)));
        descs.push((0x30000, 1, WRITE, 0));
        header(&mem, 0x10000, VIRTIO_BLK_T_IN, 0);
        let chain = descs
            .iter()
            .map(|&(addr, len, flags, next)| Descriptor::new(addr, len, flags, next));
        assert_eq!(
            Request::parse(chain, &mem),
            Err(ChainError::TooLong(6 * u64::from(big)))
        );

        // Through the queue, virtio-queue already ends such a chain at 4 GiB; it is rejected
        // all the same, with nothing used.
        let path = disk("too-long", 1);
        let mut blk = Block::open(&path, false, "x").unwrap();
        let mut q = queue_with(&mem, &descs);
        assert!(blk.process_queue(0, std::slice::from_mut(&mut q), &mem));
        assert_eq!(used(&mem), (1, 0));
        std::fs::remove_file(path).unwrap();
    }
}
