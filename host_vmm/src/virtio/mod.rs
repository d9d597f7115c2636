//! virtio devices over the virtio-mmio transport (virtio 1.x, "modern" register layout).
//!
//! The moving parts: [`VirtioDevice`] is what a device model implements (its id, features,
//! config space and queue handling); [`mmio::MmioTransport`] owns the register file, the queues
//! and the interrupt line and calls the device when the driver notifies a queue.

pub mod block;
pub mod mmio;
pub mod vsock;

use virtio_queue::Queue;

use crate::memory::GuestMemory;

/// `VIRTIO_F_VERSION_1`: every device here is a modern (non-legacy) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A device model behind a virtio transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 = block, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// The largest size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific config space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Called once the driver sets DRIVER_OK with the features it accepted.
    fn activate(&mut self, _acked_features: u64) {}
    /// Handles the buffers the driver made available on queue `index` (all queues are passed:
    /// a notify on one queue may produce buffers for another). Returns whether any buffer was
    /// used, so the driver needs an interrupt.
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool;
    /// Called with the vCPUs paused, just before a snapshot saves the device and guest
    /// memory: puts into the queues whatever a restored guest must learn (vsock: its
    /// connections are gone). Returns whether a buffer was used.
    fn prepare_snapshot(&mut self, _queues: &mut [Queue], _mem: &GuestMemory) -> bool {
        false
    }
}

/// Copies the bytes of `config` at `offset` into `data`, zero past the end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(config.len());
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}
