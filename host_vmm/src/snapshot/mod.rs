//! Full snapshots, Firecracker's way: `PUT /snapshot/create` on a paused VM writes a state
//! file and a memory file; `PUT /snapshot/load` on a fresh kindling-vmm rebuilds the VM from
//! them, paused or running.
//!
//! The state file is JSON: a format name and version (checked before anything else is read,
//! so a file of another version is refused with both versions named), the machine's shape,
//! KVM's VM and vCPU state ([`kvm_state`]) and every device's ([`DevicesState`]). The memory
//! file is guest RAM, region after region; a restored VM maps it privately (copy-on-write),
//! so a restore reads only the pages the guest touches and never changes the file.
//!
//! What the clones of one snapshot share: everything in guest memory, including the kernel's
//! random pool and whatever ids the guest made up, and its MAC addresses; their vsock
//! connections do not survive (the guest is told with a transport reset, as Firecracker
//! does). A network device opens its tap again by name, or by the name (or inherited
//! descriptor, Kindling's `host_dev_fd`) `network_overrides` gives its `iface_id`
//! (Firecracker's way for clones on one host).

pub mod kvm_state;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, WriteVolatile};

use self::kvm_state::{KvmStateError, VcpuState, VmState};
use crate::devices::i8042::{I8042State, I8042};
use crate::devices::serial::{SerialDevice, SerialSnapshot};
use crate::memory::{ram_regions, reserve_aligned, GuestMemory};
use crate::vcpu::VcpuControl;
use crate::virtio::block::{Block, BlockState};
use crate::virtio::mmio::{MmioTransport, TransportState};
use crate::virtio::net::{Net, NetState};
use crate::virtio::vsock::{Vsock, VsockState};
use crate::virtio::VirtioDevice;

/// The state file's format name.
pub const FORMAT: &str = "kindling-vmm snapshot";
/// The state file version this kindling-vmm writes and reads.
pub const VERSION: u32 = 1;

/// Why a snapshot could not be taken or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the microVM must be paused to create a snapshot")]
    NotPaused,
    #[error("the microVM has stopped")]
    Stopped,
    #[error("{0}")]
    Vcpus(String),
    #[error(transparent)]
    Kvm(#[from] KvmStateError),
    #[error("{0}: {1}")]
    File(PathBuf, std::io::Error),
    #[error("{0} is not a kindling-vmm snapshot: {1}")]
    NotASnapshot(PathBuf, String),
    #[error("{path} is a version {found} snapshot; this kindling-vmm reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("the snapshot does not match itself: {0}")]
    Inconsistent(String),
    #[error("memory file {path}: {len} bytes, the snapshot's guest has {expected}")]
    MemoryFileSize {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    #[error("mapping guest memory: {0}")]
    Mmap(String),
    #[error("prefetch: {0}")]
    Prefetch(String),
}

/// `PUT /snapshot/create`'s body (Firecracker's `SnapshotCreateParams`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
}

/// Only full snapshots exist here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

/// `PUT /snapshot/load`'s body (Firecracker's `SnapshotLoadParams`): the memory file as
/// `mem_backend` (a `File` backend) or the older `mem_file_path`, exactly one of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadParams {
    pub snapshot_path: PathBuf,
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub resume_vm: bool,
    /// Kindling's addition for clones running side by side: the vsock device's host socket
    /// (the snapshot's path may still be taken by the VM it was made from).
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// Another tap for a network device, by its `iface_id` (Firecracker's
    /// `network_overrides`).
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// Kindling's addition: byte ranges of the memory file read into memory at load
    /// instead of faulted in page by page as the guest touches them (the pages a restored
    /// guest is known to touch first; see [`map_memory`]). Page-aligned, within the file.
    #[serde(default)]
    pub prefetch: Vec<FileRange>,
}

/// A page-aligned byte range of a memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRange {
    pub offset: u64,
    pub len: u64,
}

impl FileRange {
    /// Where the range ends; `None` past `u64`.
    fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }
}

/// Where guest memory comes from on load.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: PathBuf,
}

/// `File` only: Firecracker's `Uffd` backend hands page faults to another process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

/// A new host socket path for the restored vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// The tap a restored network device opens instead of the snapshot's.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
    /// Kindling's addition, as in `network-interfaces`: that tap as an inherited
    /// descriptor, adopted instead of opening it by name.
    #[serde(default)]
    pub host_dev_fd: Option<i32>,
}

impl LoadParams {
    /// The memory file, once the body is known to be one kindling-vmm can load.
    pub fn validate(&self) -> Result<&Path, String> {
        if self.enable_diff_snapshots {
            return Err("Diff snapshots are not supported by kindling-vmm.".into());
        }
        crate::config::check_tap_fds(self.network_overrides.iter().map(|o| o.host_dev_fd))
            .map_err(|e| e.0)?;
        const PAGE: u64 = 4096;
        if let Some(r) = self
            .prefetch
            .iter()
            .find(|r| r.offset % PAGE != 0 || r.len % PAGE != 0)
        {
            return Err(format!(
                "prefetch: {r:?} is not page-aligned (offset and len multiples of {PAGE})."
            ));
        }
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) | (None, None) => Err(
                "Exactly one of mem_backend or mem_file_path must be given to load a snapshot."
                    .into(),
            ),
            (None, Some(path)) => Ok(path),
            (Some(b), None) if b.backend_type == MemBackendType::File => Ok(&b.backend_path),
            (Some(_), None) => Err("Only the File memory backend is supported.".into()),
        }
    }
}

/// The machine's shape, which the memory layout follows from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShape {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
}

/// A virtio device in its slot.
#[derive(Debug, Serialize, Deserialize)]
pub struct VirtioSnapshot {
    pub base: u64,
    pub irq: u32,
    pub device: DeviceState,
    pub transport: TransportState,
}

/// A virtio device's own state: enough to open its backend again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    Block(BlockState),
    Net(NetState),
    Vsock(VsockState),
}

/// Devices a snapshot can rebuild.
pub trait Persist {
    fn device_state(&self) -> DeviceState;
}

impl Persist for Block {
    fn device_state(&self) -> DeviceState {
        DeviceState::Block(self.state())
    }
}

impl Persist for Net {
    fn device_state(&self) -> DeviceState {
        DeviceState::Net(self.state())
    }
}

impl Persist for Vsock {
    fn device_state(&self) -> DeviceState {
        DeviceState::Vsock(self.state())
    }
}

/// A virtio transport as the snapshot code holds it, whatever its device.
pub trait SaveTransport: Send {
    /// Prepares the device (see `VirtioDevice::prepare_snapshot`) and returns its state and
    /// the transport's.
    fn save(&mut self) -> (DeviceState, TransportState);
}

impl<D: VirtioDevice + Persist> SaveTransport for MmioTransport<D> {
    fn save(&mut self) -> (DeviceState, TransportState) {
        self.prepare_snapshot();
        (self.device().device_state(), self.state())
    }
}

/// The legacy devices and virtio devices of a snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialSnapshot,
    pub i8042: I8042State,
    pub virtio: Vec<VirtioSnapshot>,
}

/// The first fields of every state file, read alone to check the version.
#[derive(Deserialize)]
struct Header {
    format: String,
    version: u32,
}

/// A whole microVM except its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    format: String,
    version: u32,
    pub machine: MachineShape,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

impl MicrovmState {
    /// Reads and checks a state file: format and version first, then that it describes one
    /// machine (a vCPU state per vCPU).
    pub fn read(path: &Path) -> Result<Self, SnapshotError> {
        let file_err = |e| SnapshotError::File(path.to_path_buf(), e);
        let bytes = std::fs::read(path).map_err(file_err)?;
        let not_a_snapshot =
            |e: serde_json::Error| SnapshotError::NotASnapshot(path.to_path_buf(), e.to_string());
        let header: Header = serde_json::from_slice(&bytes).map_err(not_a_snapshot)?;
        if header.format != FORMAT {
            return Err(SnapshotError::NotASnapshot(
                path.to_path_buf(),
                format!("its format is {:?}", header.format),
            ));
        }
        if header.version != VERSION {
            return Err(SnapshotError::Version {
                path: path.to_path_buf(),
                found: header.version,
            });
        }
        let state: Self = serde_json::from_slice(&bytes).map_err(not_a_snapshot)?;
        if state.vcpus.len() != usize::from(state.machine.vcpu_count) || state.vcpus.is_empty() {
            return Err(SnapshotError::Inconsistent(format!(
                "{} vCPU states for {} vCPUs",
                state.vcpus.len(),
                state.machine.vcpu_count
            )));
        }
        Ok(state)
    }

    fn write(&self, path: &Path) -> Result<(), SnapshotError> {
        write_replacing(path, |file| {
            let mut out = BufWriter::new(file);
            serde_json::to_writer(&mut out, self).map_err(std::io::Error::other)?;
            out.flush()
        })
    }
}

/// Guest RAM from a memory file, mapped privately at huge-page-aligned addresses (see
/// [`crate::memory`]): pages are read from the file when the guest first touches them and
/// copied when it first writes them. The `prefetch` ranges of the file are instead read
/// into anonymous memory at once (huge pages where the host has them), so that the guest
/// finds them mapped, 2 MiB to a nested page table entry; the file is never written either
/// way.
pub fn map_memory(
    path: &Path,
    machine: MachineShape,
    prefetch: &[FileRange],
) -> Result<GuestMemory, SnapshotError> {
    let file_err = |e| SnapshotError::File(path.to_path_buf(), e);
    let regions = machine
        .mem_size_mib
        .checked_mul(1 << 20)
        .and_then(ram_regions)
        .ok_or_else(|| {
            SnapshotError::Inconsistent(format!("{} MiB of memory", machine.mem_size_mib))
        })?;
    let file = File::open(path).map_err(file_err)?;
    let len = file.metadata().map_err(file_err)?.len();
    let expected: u64 = regions.iter().map(|(_, size)| *size as u64).sum();
    if len != expected {
        return Err(SnapshotError::MemoryFileSize {
            path: path.to_path_buf(),
            len,
            expected,
        });
    }
    if let Some(past) = prefetch
        .iter()
        .find(|r| r.end().is_none_or(|end| end > len))
    {
        return Err(SnapshotError::Prefetch(format!(
            "{past:?} is not within the {len} bytes of {}",
            path.display()
        )));
    }
    let mmap_err = |e: crate::memory::MemoryError| SnapshotError::Mmap(e.to_string());
    let mut file_start = 0u64;
    let mut mapped = Vec::with_capacity(regions.len());
    for (base, size) in regions {
        let file_end = file_start + size as u64;
        let ram = reserve_aligned(size).map_err(mmap_err)?;
        ram.map_file(0, size, &file, file_start).map_err(mmap_err)?;
        for range in prefetch {
            let start = range.offset.max(file_start);
            let end = range.end().unwrap_or(0).min(file_end);
            if start < end {
                let at = usize::try_from(start - file_start)
                    .map_err(|e| SnapshotError::Prefetch(e.to_string()))?;
                let n = usize::try_from(end - start)
                    .map_err(|e| SnapshotError::Prefetch(e.to_string()))?;
                ram.copy_in(at, n, &file, start).map_err(mmap_err)?;
            }
        }
        mapped.push(ram.into_region(base).map_err(mmap_err)?);
        file_start = file_end;
    }
    GuestMemory::from_regions(mapped).map_err(|e| SnapshotError::Mmap(e.to_string()))
}

/// Writes guest RAM, region after region.
fn write_memory(memory: &GuestMemory, path: &Path) -> Result<(), SnapshotError> {
    write_replacing(path, |file| {
        for region in memory.iter() {
            let slice = region.as_volatile_slice().map_err(std::io::Error::other)?;
            file.write_all_volatile(&slice)
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    })
}

/// Writes `path` through a temporary file in its directory, synced and then renamed over it.
/// A failed snapshot leaves no half-written file behind, and replacing the memory file a VM
/// was restored from never truncates the file its memory is still mapped from (the mapping
/// keeps the old file).
fn write_replacing(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), SnapshotError> {
    let file_err = |e| SnapshotError::File(path.to_path_buf(), e);
    let mut name = path
        .file_name()
        .ok_or_else(|| file_err(std::io::ErrorKind::InvalidInput.into()))?
        .to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    let temporary = path.with_file_name(name);
    let written = File::create(&temporary).and_then(|mut file| {
        write(&mut file)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written.map_err(file_err)
}

/// What a running VM's snapshot is made of, owned by the running VM: the devices close
/// (sockets unlinked) when the VM is gone, whoever still holds a [`Snapshotter`].
#[derive(Debug)]
pub struct SnapshotSources(Arc<Sources>);

/// Takes snapshots of a running VM (the API thread holds one).
#[derive(Clone)]
pub struct Snapshotter(Weak<Sources>);

/// The parts of a running VM that a snapshot reads.
pub struct Sources {
    pub machine: MachineShape,
    pub vm_fd: Arc<VmFd>,
    pub memory: GuestMemory,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub virtio: Vec<VirtioSource>,
    pub vcpus: VcpuControl,
}

/// A virtio device's slot and transport.
#[derive(Clone)]
pub struct VirtioSource {
    pub base: u64,
    pub irq: u32,
    pub transport: Arc<Mutex<dyn SaveTransport>>,
}

impl std::fmt::Debug for VirtioSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioSource")
            .field("base", &self.base)
            .field("irq", &self.irq)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("machine", &self.machine)
            .field("virtio", &self.virtio)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter").finish_non_exhaustive()
    }
}

impl SnapshotSources {
    pub fn new(sources: Sources) -> Self {
        Self(Arc::new(sources))
    }

    pub fn snapshotter(&self) -> Snapshotter {
        Snapshotter(Arc::downgrade(&self.0))
    }
}

impl Snapshotter {
    /// Takes a full snapshot of the paused VM. Every virtio transport stays locked from its
    /// state being read until guest memory is written, so that host-side device work on the
    /// event loop (vsock data arriving) cannot change memory the state no longer describes.
    pub fn create(&self, params: &CreateParams) -> Result<(), SnapshotError> {
        let s = self.0.upgrade().ok_or(SnapshotError::Stopped)?;
        if !s.vcpus.is_paused() {
            return Err(SnapshotError::NotPaused);
        }
        let vcpus = s
            .vcpus
            .save_states()
            .map_err(|e| SnapshotError::Vcpus(e.to_string()))?;
        let mut transports: Vec<_> = s.virtio.iter().map(|v| lock(&v.transport)).collect();
        let virtio = s
            .virtio
            .iter()
            .zip(transports.iter_mut())
            .map(|(source, transport)| {
                let (device, transport) = transport.save();
                VirtioSnapshot {
                    base: source.base,
                    irq: source.irq,
                    device,
                    transport,
                }
            })
            .collect();
        let state = MicrovmState {
            format: FORMAT.into(),
            version: VERSION,
            machine: s.machine,
            devices: DevicesState {
                serial: lock(&s.serial).state(),
                i8042: lock(&s.i8042).state(),
                virtio,
            },
            vm: VmState::save(&s.vm_fd)?,
            vcpus,
        };
        state.write(&params.snapshot_path)?;
        write_memory(&s.memory, &params.mem_file_path)?;
        drop(transports);
        Ok(())
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
