//! The virtio-mmio transport (virtio 1.2 §4.2.2): a 4 KiB register page per device. Queue
//! notifications are handled synchronously on the vCPU that wrote QueueNotify, which keeps the
//! device model single-threaded and needs no extra thread for block I/O on a microVM.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_superio::Trigger;

use super::VirtioDevice;
use crate::bus::BusDevice;
use crate::devices::IrqLine;
use crate::memory::GuestMemory;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

/// One virtio device as the guest sees it at its MMIO slot.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemory,
    irq: IrqLine,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D, mem: GuestMemory, irq: IrqLine) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect();
        Self {
            device,
            mem,
            irq,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
        }
    }

    /// The device model, e.g. for the event loop of a device with host-side I/O.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn driver_ok(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_FAILED == 0
    }

    /// Raises the used-buffer interrupt.
    pub fn signal_used(&mut self) {
        self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
        if let Err(e) = self.irq.trigger() {
            tracing::warn!("virtio interrupt failed: {e}");
        }
    }

    /// Lets the device handle queue `index` if the driver set it up; raises the interrupt
    /// when buffers were used.
    pub fn process_queue(&mut self, index: usize) {
        if !self.driver_ok() {
            return;
        }
        // Every queue must be usable: a device may touch another queue than the notified one.
        if index >= self.queues.len()
            || !self
                .queues
                .iter()
                .all(|q| q.ready() && q.is_valid(&self.mem))
        {
            tracing::debug!("notify for queue {index} while queues are missing or invalid");
            return;
        }
        if self
            .device
            .process_queue(index, &mut self.queues, &self.mem)
        {
            self.signal_used();
        }
    }

    fn reset(&mut self) {
        self.queues.iter_mut().for_each(Queue::reset);
        self.queue_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn set_status(&mut self, status: u32) {
        if status == 0 {
            self.reset();
            return;
        }
        let newly = status & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.driver_features & !self.device.features() != 0
        {
            // The driver accepted features the device never offered: refuse FEATURES_OK.
            self.status = status & !VIRTIO_CONFIG_S_FEATURES_OK;
            return;
        }
        self.status = status;
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.device.activate(self.driver_features);
        }
    }

    fn read_reg(&mut self, reg: u32) -> u32 {
        match reg {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, reg: u32, value: u32) {
        // Queue layout may only change before the driver is done (virtio 1.2 §4.2.3.2).
        let queue_setup_allowed = self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match reg {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                let v = u64::from(value);
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NOTIFY => self.process_queue(value as usize),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.set_status(value),
            _ if queue_setup_allowed => self.write_queue_reg(reg, value),
            _ => tracing::debug!("virtio-mmio write to {reg:#x} after DRIVER_OK ignored"),
        }
    }

    fn write_queue_reg(&mut self, reg: u32, value: u32) {
        let Some(q) = self.selected_queue() else {
            return;
        };
        match reg {
            VIRTIO_MMIO_QUEUE_NUM => q.set_size(value as u16),
            VIRTIO_MMIO_QUEUE_READY => q.set_ready(value == 1),
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.set_used_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => tracing::debug!("virtio-mmio write to unknown register {reg:#x}"),
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
        } else if data.len() == 4 {
            data.copy_from_slice(&self.read_reg(offset as u32).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset < u64::from(VIRTIO_MMIO_CONFIG) => {
                self.write_reg(offset as u32, u32::from_le_bytes(bytes))
            }
            _ => tracing::debug!(
                "virtio-mmio write of {} bytes at {offset:#x} ignored",
                data.len()
            ),
        }
    }
}
