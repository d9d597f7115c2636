//! virtio devices over the virtio-mmio transport (virtio 1.x, "modern" register layout).
//!
//! The moving parts: [`VirtioDevice`] is what a device model implements (its id, features,
//! config space and queue handling); [`mmio::MmioTransport`] owns the register file, the queues
//! and the interrupt line and calls the device when the driver notifies a queue;
//! [`checked_descriptors`] is where every device starts reading a descriptor chain.

pub mod block;
pub mod mmio;
pub mod net;
pub mod vsock;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::GuestMemoryBackend;

use crate::memory::GuestMemory;

/// Warnings that a guest triggers at will (a malformed chain, a broken request): the first
/// [`GuestWarnings::FIRST`] are logged, then one in every [`GuestWarnings::EVERY`] with how
/// many there were, so that a hostile guest cannot flood the VMM's log.
#[derive(Debug, Default)]
pub struct GuestWarnings {
    seen: u64,
}

impl GuestWarnings {
    pub const FIRST: u64 = 16;
    pub const EVERY: u64 = 1024;

    /// Counts one warning and logs it (as `what`, with the count so far) unless too many
    /// came before; returns whether it was logged.
    pub fn warn(&mut self, what: std::fmt::Arguments) -> bool {
        self.seen += 1;
        let logged = self.seen <= Self::FIRST || self.seen.is_multiple_of(Self::EVERY);
        if logged {
            tracing::warn!(guest_warnings = self.seen, "{what}");
        }
        logged
    }
}

/// `VIRTIO_F_VERSION_1`: every device here is a modern (non-legacy) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A device model behind a virtio transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (1 = network, 2 = block, 19 = vsock).
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

/// Why a descriptor chain is unusable, whatever the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("empty descriptor chain")]
    Empty,
    #[error("descriptor chain loops, is longer than the queue or points past the table")]
    Truncated,
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange { addr: u64, len: u32 },
}

/// The descriptors of one chain (as virtio-queue yields them), each checked to lie wholly in
/// guest memory. virtio-queue stops a chain after queue-size descriptors or at a bad `next`;
/// a chain whose last descriptor still has NEXT set was cut short and is refused.
pub fn checked_descriptors(
    descriptors: impl Iterator<Item = Descriptor>,
    mem: &GuestMemory,
) -> Result<Vec<Descriptor>, DescriptorError> {
    let descs: Vec<Descriptor> = descriptors.collect();
    match descs.last() {
        None => return Err(DescriptorError::Empty),
        Some(last) if last.has_next() => return Err(DescriptorError::Truncated),
        Some(_) => {}
    }
    for d in &descs {
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(DescriptorError::OutOfRange {
                addr: d.addr().0,
                len: d.len(),
            });
        }
    }
    Ok(descs)
}

/// The driver's side of a device's queues, for device tests.
#[cfg(test)]
pub(crate) mod test_rings {
    use virtio_queue::{Queue, QueueT};

    /// Queue `q`'s descriptor table, available ring and used ring: a page each, from
    /// 0x1000 + 0x3000 * q.
    pub fn ring(q: usize) -> (u64, u64, u64) {
        let base = 0x1000 + 0x3000 * u64::try_from(q).unwrap();
        (base, base + 0x1000, base + 0x2000)
    }

    /// `count` ready queues of `size` entries, laid out by [`ring`].
    pub fn queues(count: usize, size: u16) -> Vec<Queue> {
        (0..count)
            .map(|q| {
                let (d, a, u) = ring(q);
                let mut queue = Queue::new(size).unwrap();
                queue.set_size(size);
                let low = |addr: u64| Some(u32::try_from(addr).unwrap());
                queue.set_desc_table_address(low(d), Some(0));
                queue.set_avail_ring_address(low(a), Some(0));
                queue.set_used_ring_address(low(u), Some(0));
                queue.set_ready(true);
                queue
            })
            .collect()
    }
}

#[cfg(test)]
mod guest_warnings_tests {
    use super::GuestWarnings;

    #[test]
    fn a_flood_of_guest_warnings_logs_the_first_then_one_in_every_1024() {
        let mut warnings = GuestWarnings::default();
        let logged = (0..10_000)
            .filter(|n| warnings.warn(format_args!("bad chain {n}")))
            .count();
        assert_eq!(logged, 16 + 10_000 / 1024);
    }
}
