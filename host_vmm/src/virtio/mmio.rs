//! The virtio-mmio transport (virtio 1.2 §4.2.2): a 4 KiB register page per device. Queue
//! notifications are handled synchronously on the vCPU that wrote QueueNotify, which keeps the
//! device model single-threaded and needs no extra thread for block I/O on a microVM.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_superio::Trigger;

use super::VirtioDevice;
use crate::bus::BusDevice;
use crate::devices::IrqLine;
use crate::memory::GuestMemory;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

/// One virtio device as the guest sees it at its MMIO slot.
#[derive(Debug)]
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemory,
    irq: IrqLine,
    queues: Vec<Queue>,
    regs: Registers,
}

/// The transport's registers as the driver set them; a snapshot saves them whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registers {
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
            regs: Registers::default(),
        }
    }

    /// The transport as a snapshot left it, around `device`: registers, negotiated features
    /// and queue positions. A live device is activated again; an interrupt the guest had not
    /// acknowledged is for the VM to raise again ([`TransportState::interrupt_pending`])
    /// once its interrupt controllers are restored.
    pub fn from_state(
        device: D,
        mem: GuestMemory,
        irq: IrqLine,
        state: &TransportState,
    ) -> Result<Self, String> {
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(format!(
                "{} queues saved for a device with {}",
                state.queues.len(),
                max_sizes.len()
            ));
        }
        let queues = state
            .queues
            .iter()
            .zip(max_sizes)
            .map(|(QueueSnapshot(q), &max)| {
                if q.max_size != max {
                    return Err(format!(
                        "queue of {} entries where the device has {max}",
                        q.max_size
                    ));
                }
                Queue::try_from(*q).map_err(|e| format!("queue: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut transport = Self {
            device,
            mem,
            irq,
            queues,
            regs: state.registers,
        };
        if transport.driver_ok() {
            transport.device.activate(transport.regs.driver_features);
        }
        Ok(transport)
    }

    /// The transport's half of a snapshot (the device's own is [`Self::device`]'s).
    pub fn state(&self) -> TransportState {
        TransportState {
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot(q.state()))
                .collect(),
            registers: self.regs,
        }
    }

    /// Lets a live device prepare for a snapshot (see [`VirtioDevice::prepare_snapshot`]).
    pub fn prepare_snapshot(&mut self) {
        if self.driver_ok() && self.device.prepare_snapshot(&mut self.queues, &self.mem) {
            self.signal_used();
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, e.g. for the event loop of a device with host-side I/O.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.regs.queue_sel as usize)
    }

    fn driver_ok(&self) -> bool {
        self.regs.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.regs.status & VIRTIO_CONFIG_S_FAILED == 0
    }

    /// Raises the used-buffer interrupt.
    pub fn signal_used(&mut self) {
        self.regs.interrupt_status |= VIRTIO_MMIO_INT_VRING;
        if let Err(e) = self.irq.trigger() {
            tracing::warn!("virtio interrupt failed: {e}");
        }
    }

    /// Lets the device handle queue `index` if the driver set it up; raises the interrupt
    /// when buffers were used.
    pub fn process_queue(&mut self, index: usize) {
        if index >= self.queues.len() {
            tracing::debug!("notify for queue {index}, which the device does not have");
            return;
        }
        if !self.run_device(|device, queues, mem| device.process_queue(index, queues, mem)) {
            tracing::debug!("notify for queue {index} while the device is not live");
        }
    }

    /// Runs `work` on the device and its queues if the device is live (DRIVER_OK, every
    /// queue set up: a device may touch another queue than the one it works for); raises
    /// the interrupt when `work` says it used buffers. Returns whether the device was live.
    pub fn run_device(
        &mut self,
        work: impl FnOnce(&mut D, &mut [Queue], &GuestMemory) -> bool,
    ) -> bool {
        let live = self.driver_ok()
            && self
                .queues
                .iter()
                .all(|q| q.ready() && q.is_valid(&self.mem));
        if live && work(&mut self.device, &mut self.queues, &self.mem) {
            self.signal_used();
        }
        live
    }

    fn reset(&mut self) {
        self.queues.iter_mut().for_each(Queue::reset);
        self.regs.queue_sel = 0;
        self.regs.driver_features = 0;
        self.regs.status = 0;
        self.regs.interrupt_status = 0;
    }

    fn set_status(&mut self, mut status: u32) {
        if status == 0 {
            self.reset();
            return;
        }
        if status & !self.regs.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.regs.driver_features & !self.device.features() != 0
        {
            // The driver accepted features the device never offered: refuse FEATURES_OK.
            status &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            // The device goes live only after a successful negotiation (virtio 1.2 §3.1.1).
            tracing::debug!("virtio-mmio DRIVER_OK without FEATURES_OK ignored");
            status &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        let newly = status & !self.regs.status;
        self.regs.status = status;
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.device.activate(self.regs.driver_features);
        }
    }

    fn read_reg(&mut self, reg: u32) -> u32 {
        match reg {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.regs.device_features_sel {
                0 => (self.device.features() & 0xffff_ffff) as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.regs.interrupt_status,
            VIRTIO_MMIO_STATUS => self.regs.status,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, reg: u32, value: u32) {
        // Queue layout may only change before the driver is done (virtio 1.2 §4.2.3.2).
        let queue_setup_allowed = self.regs.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match reg {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.regs.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.regs.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                let v = u64::from(value);
                match self.regs.driver_features_sel {
                    0 => self.regs.driver_features = (self.regs.driver_features & !0xffff_ffff) | v,
                    1 => {
                        self.regs.driver_features =
                            (self.regs.driver_features & 0xffff_ffff) | (v << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.regs.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NOTIFY => self.process_queue(value as usize),
            VIRTIO_MMIO_INTERRUPT_ACK => self.regs.interrupt_status &= !value,
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
            // A size that does not fit the 16-bit field is refused, never cut down to one that
            // might pass (0x1_0100 would otherwise become 256).
            VIRTIO_MMIO_QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => q.set_size(size),
                Err(_) => tracing::debug!("virtio-mmio queue size {value} refused"),
            },
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

impl TransportState {
    /// Whether the guest had not yet acknowledged an interrupt (the snapshot may have
    /// caught it in flight, before it reached the interrupt controller).
    pub fn interrupt_pending(&self) -> bool {
        self.registers.interrupt_status != 0
    }
}

/// A transport in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    queues: Vec<QueueSnapshot>,
    #[serde(flatten)]
    registers: Registers,
}

/// virtio-queue's [`QueueState`], which has no serde, through serde's remote derive
/// ([`QueueStateDef`]); checked again by `Queue::try_from` on restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct QueueSnapshot(#[serde(with = "QueueStateDef")] QueueState);

/// [`QueueState`]'s fields, for serde.
#[derive(Serialize, Deserialize)]
#[serde(remote = "QueueState")]
struct QueueStateDef {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
        } else if let (Ok(reg), 4) = (u32::try_from(offset), data.len()) {
            data.copy_from_slice(&self.read_reg(reg).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (u32::try_from(offset), <[u8; 4]>::try_from(data)) {
            (Ok(reg), Ok(bytes)) if reg < VIRTIO_MMIO_CONFIG => {
                self.write_reg(reg, u32::from_le_bytes(bytes))
            }
            _ => tracing::debug!(
                "virtio-mmio write of {} bytes at {offset:#x} ignored",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use vmm_sys_util::eventfd::EventFd;

    /// A device with one queue of up to 256 entries and nothing behind it; it records
    /// what the transport asked of it.
    #[derive(Debug, Default)]
    struct Dummy {
        activated: Option<u64>,
        processed: usize,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            0
        }
        fn features(&self) -> u64 {
            crate::virtio::VIRTIO_F_VERSION_1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256]
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(&mut self, acked_features: u64) {
            self.activated = Some(acked_features);
        }
        fn process_queue(&mut self, _: usize, _: &mut [Queue], _: &GuestMemory) -> bool {
            self.processed += 1;
            true
        }
    }

    fn transport() -> MmioTransport<Dummy> {
        let mem = create_guest_memory(1).unwrap();
        MmioTransport::new(Dummy::default(), mem, IrqLine(EventFd::new(0).unwrap()))
    }

    fn read(t: &mut MmioTransport<Dummy>, reg: u32) -> u32 {
        let mut word = [0u8; 4];
        t.read(u64::from(reg), &mut word);
        u32::from_le_bytes(word)
    }

    const ACKNOWLEDGE: u32 = 1;
    const DRIVER: u32 = 2;

    /// The driver's side of virtio 1.2 §3.1.1 up to FEATURES_OK, accepting `features`.
    fn negotiate(t: &mut MmioTransport<Dummy>, features: u64) -> u32 {
        write(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        write(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
        for sel in 0..2u32 {
            write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            let word = (features >> (32 * sel)) & 0xffff_ffff;
            write(t, VIRTIO_MMIO_DRIVER_FEATURES, u32::try_from(word).unwrap());
        }
        let status = ACKNOWLEDGE | DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        write(t, VIRTIO_MMIO_STATUS, status);
        read(t, VIRTIO_MMIO_STATUS)
    }

    /// A queue whose rings lie in guest memory, ready for the device.
    fn set_up_queue(t: &mut MmioTransport<Dummy>) {
        write(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write(t, VIRTIO_MMIO_QUEUE_NUM, 16);
        write(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        write(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
        write(t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
        write(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    #[test]
    fn the_status_handshake_activates_the_device_with_the_accepted_features() {
        let mut t = transport();
        let status = negotiate(&mut t, crate::virtio::VIRTIO_F_VERSION_1);
        assert_ne!(
            status & VIRTIO_CONFIG_S_FEATURES_OK,
            0,
            "FEATURES_OK sticks"
        );
        set_up_queue(&mut t);
        write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(t.device.processed, 0, "no queue work before DRIVER_OK");
        assert_eq!(t.device.activated, None);
        write(
            &mut t,
            VIRTIO_MMIO_STATUS,
            status | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_eq!(t.device.activated, Some(crate::virtio::VIRTIO_F_VERSION_1));
        write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(t.device.processed, 1);
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        assert_eq!(
            t.irq.0.read().unwrap(),
            1,
            "the used-buffer interrupt was raised"
        );
        write(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // A notify for a queue the device does not have does nothing.
        write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
        assert_eq!(t.device.processed, 1);
    }

    #[test]
    fn features_the_device_never_offered_are_refused_at_features_ok() {
        let mut t = transport();
        let status = negotiate(&mut t, crate::virtio::VIRTIO_F_VERSION_1 | 1 << 5);
        assert_eq!(
            status & VIRTIO_CONFIG_S_FEATURES_OK,
            0,
            "FEATURES_OK refused"
        );
        set_up_queue(&mut t);
        // Without FEATURES_OK the device never goes live, nor in one write of every bit.
        for attempt in [status, ACKNOWLEDGE | DRIVER | VIRTIO_CONFIG_S_FEATURES_OK] {
            write(
                &mut t,
                VIRTIO_MMIO_STATUS,
                attempt | VIRTIO_CONFIG_S_DRIVER_OK,
            );
            assert_eq!(
                read(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK,
                0
            );
            write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        }
        assert_eq!(t.device.activated, None);
        assert_eq!(t.device.processed, 0);
    }

    #[test]
    fn the_queue_layout_is_frozen_after_driver_ok_and_a_reset_clears_everything() {
        let mut t = transport();
        let status = negotiate(&mut t, crate::virtio::VIRTIO_F_VERSION_1);
        set_up_queue(&mut t);
        write(
            &mut t,
            VIRTIO_MMIO_STATUS,
            status | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 32);
        write(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8000);
        write(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(t.queues[0].size(), 16, "size frozen");
        assert_eq!(t.queues[0].desc_table(), 0x1000, "rings frozen");
        assert!(t.queues[0].ready(), "still ready");
        write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_ne!(read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        // Writing 0 to the status resets the device (virtio 1.2 §4.2.2.1).
        write(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(t.queues[0].size(), 256, "back to the maximum");
        assert_eq!(t.regs.driver_features, 0);
        let processed = t.device.processed;
        write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(t.device.processed, processed, "no queue work after a reset");
        // And the queue can be set up anew.
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 32);
        assert_eq!(t.queues[0].size(), 32);
    }

    fn write(t: &mut MmioTransport<Dummy>, reg: u32, value: u32) {
        t.write(u64::from(reg), &value.to_le_bytes());
    }

    #[test]
    fn a_queue_size_beyond_16_bits_is_refused_not_truncated() {
        let mut t = transport();
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        assert_eq!(t.queues[0].size(), 16);
        // 0x1_0100 truncated to 16 bits is 256, a size the queue would accept.
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 0x1_0100);
        assert_eq!(t.queues[0].size(), 16);
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, u32::MAX);
        assert_eq!(t.queues[0].size(), 16);
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 256);
        assert_eq!(t.queues[0].size(), 256);
    }

    #[test]
    fn feature_words_and_register_reads() {
        let mut t = transport();
        assert_eq!(read(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
        write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            1,
            "VERSION_1 is bit 32"
        );
        // Only whole 32-bit registers are read.
        let mut half = [0xffu8; 2];
        t.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut half);
        assert_eq!(half, [0, 0]);
    }
}
