//! A KVM virtual machine assembled step by step (the order rust-vmm's vmm-reference uses):
//! VM and memory slots, in-kernel IRQ chip and PIT, legacy devices on the buses, then, when
//! started, the vCPUs on their threads. A VM restored from a snapshot is assembled the same
//! way, each step from its saved state instead of from scratch.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vm_superio::Trigger;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Bus, OverlapError};
use crate::cpu::{self, CpuError, EntryPoint};
use crate::cpu_template::CpuTemplate;
use crate::devices::boot_timer::{BootTime, BootTimer};
use crate::devices::i8042::{CtrlAltDel, I8042};
use crate::devices::serial::{SerialDevice, SerialOut};
use crate::devices::IrqLine;
use crate::exit::{ExitReason, VmExit};
use crate::layout;
use crate::memory::{create_guest_memory, GuestMemory};
use crate::metrics;
use crate::seccomp::Filters;
use crate::snapshot::kvm_state::{self, VcpuState, VmState};
use crate::snapshot::{
    DevicesState, MachineShape, Persist, SaveTransport, SnapshotSources, Snapshotter, Sources,
    VirtioSource,
};
use crate::vcpu::{Vcpu, VcpuControl};
use crate::virtio::mmio::{MmioTransport, TransportState};
use crate::virtio::net::{Net, NetEvents};
use crate::virtio::vsock::{Vsock, VsockEvents};
use crate::virtio::VirtioDevice;

/// Errors building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM {0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("allocating guest memory")]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Bus(#[from] OverlapError),
    #[error("setting up vCPU")]
    Cpu(#[from] CpuError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("event loop: {0}")]
    Events(String),
    #[error("invalid machine configuration: {0}")]
    Config(String),
    #[error("restoring the snapshot: {0}")]
    Restore(String),
    #[error("restoring the snapshot")]
    KvmState(#[from] kvm_state::KvmStateError),
}

/// The shape of the machine.
pub struct VmConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    /// Where the guest console goes.
    pub serial: SerialOut,
    /// CPUID masks applied on top of the host's (filtered) CPUID.
    pub cpu_template: Option<CpuTemplate>,
}

impl fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmConfig")
            .field("vcpu_count", &self.vcpu_count)
            .field("mem_size_mib", &self.mem_size_mib)
            .field("cpu_template", &self.cpu_template)
            .finish_non_exhaustive()
    }
}

/// A VM that is built but not yet running.
pub struct Vm {
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    memory: GuestMemory,
    io_bus: Bus,
    mmio_bus: Bus,
    exit: VmExit,
    vcpu_count: u8,
    mem_size_mib: u64,
    cpu_template: Option<CpuTemplate>,
    virtio: Vec<VirtioSource>,
    subscribers: Vec<Subscriber>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: CtrlAltDel,
    seccomp: Filters,
    vcpus: VcpuControl,
    /// Interrupts a snapshot caught before the guest took them, raised again once the
    /// restored VM's interrupt controllers hold their saved state.
    pending_irqs: Vec<IrqLine>,
}

/// A device's event-loop half.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("vm_fd", &self.vm_fd)
            .field("memory", &self.memory)
            .field("io_bus", &self.io_bus)
            .field("mmio_bus", &self.mmio_bus)
            .field("exit", &self.exit)
            .field("vcpu_count", &self.vcpu_count)
            .field("cpu_template", &self.cpu_template)
            .field("virtio_devices", &self.virtio.len())
            .field("subscribers", &self.subscribers.len())
            .field("seccomp", &self.seccomp)
            .finish_non_exhaustive()
    }
}

/// Registers one eventfd as the irqfd of `gsi`.
fn irq_line(vm_fd: &VmFd, gsi: u32) -> Result<IrqLine, VmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK)?;
    vm_fd
        .register_irqfd(&evt, gsi)
        .map_err(|e| VmError::Kvm("KVM_IRQFD", e))?;
    Ok(IrqLine(evt))
}

impl Vm {
    /// Creates the VM, its memory and the legacy devices (serial, i8042).
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        if config.vcpu_count == 0 {
            return Err(VmError::Config("vcpu_count must be at least 1".into()));
        }
        if config.mem_size_mib == 0 {
            return Err(VmError::Config("mem_size_mib must be at least 1".into()));
        }
        let started = Instant::now();
        let memory = create_guest_memory(config.mem_size_mib)?;
        metrics::record_phase("guest_memory", started.elapsed());
        Self::assemble(config, memory, None)
    }

    /// The VM of a snapshot: `memory` mapped from its memory file, the legacy devices as it
    /// saved them. Its virtio devices follow with [`Self::restore_virtio_device`],
    /// [`Self::restore_net`] and [`Self::restore_vsock`], in slot order; [`Self::resume`]
    /// starts it.
    pub fn restore(
        config: VmConfig,
        memory: GuestMemory,
        devices: &DevicesState,
    ) -> Result<Self, VmError> {
        Self::assemble(config, memory, Some(devices))
    }

    fn assemble(
        config: VmConfig,
        memory: GuestMemory,
        saved: Option<&DevicesState>,
    ) -> Result<Self, VmError> {
        let started = Instant::now();
        let kvm = Kvm::new().map_err(|e| VmError::Kvm("open /dev/kvm", e))?;
        let vm_fd = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
        for (slot, region) in memory.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: u32::try_from(slot)
                    .map_err(|_| VmError::Config("too many guest memory regions".into()))?,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mmap owned by `memory`, which the VM and every vCPU
            // thread keep alive (they hold clones) for as long as the VM can run.
            unsafe { vm_fd.set_user_memory_region(region_desc) }
                .map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        let tss = usize::try_from(layout::KVM_TSS_ADDRESS)
            .map_err(|_| VmError::Config("the TSS address does not fit a usize".into()))?;
        vm_fd
            .set_tss_address(tss)
            .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm_fd
            .set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| VmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        vm_fd
            .create_irq_chip()
            .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd
            .create_pit2(pit)
            .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;

        let exit = VmExit::new()?;
        let mut io_bus = Bus::new();
        let serial_irq = irq_line(&vm_fd, layout::SERIAL_IRQ)?;
        let keyboard_irq = irq_line(&vm_fd, layout::KEYBOARD_IRQ)?;
        let mut pending_irqs = Vec::new();
        if let Some(saved) = saved {
            if saved.serial.interrupt_pending() {
                pending_irqs.push(serial_irq.try_clone()?);
            }
            if saved.i8042.interrupt_pending() {
                pending_irqs.push(keyboard_irq.try_clone()?);
            }
        }
        let (serial, i8042) = match saved {
            None => (
                SerialDevice::new(serial_irq, config.serial),
                I8042::new(exit.clone(), keyboard_irq),
            ),
            Some(saved) => (
                SerialDevice::from_state(serial_irq, config.serial, &saved.serial)
                    .map_err(VmError::Restore)?,
                I8042::from_state(exit.clone(), keyboard_irq, &saved.i8042)
                    .map_err(VmError::Restore)?,
            ),
        };
        let serial = Arc::new(Mutex::new(serial));
        io_bus.insert(
            serial.clone(),
            u64::from(layout::SERIAL_PORT),
            layout::SERIAL_PORT_LEN,
        )?;
        let i8042 = Arc::new(Mutex::new(i8042));
        io_bus.insert(
            i8042.clone(),
            u64::from(layout::I8042_PORT),
            layout::I8042_PORT_LEN,
        )?;
        metrics::record_phase("kvm_vm_and_legacy_devices", started.elapsed());
        Ok(Self {
            kvm,
            vm_fd: Arc::new(vm_fd),
            memory,
            io_bus,
            mmio_bus: Bus::new(),
            exit,
            vcpu_count: config.vcpu_count,
            mem_size_mib: config.mem_size_mib,
            cpu_template: config.cpu_template,
            virtio: Vec::new(),
            subscribers: Vec::new(),
            serial,
            i8042: CtrlAltDel(i8042),
            seccomp: Filters::off(),
            vcpus: VcpuControl::default(),
            pending_irqs,
        })
    }

    /// Presses Ctrl-Alt-Del on this VM's keyboard controller.
    pub fn ctrl_alt_del(&self) -> CtrlAltDel {
        self.i8042.clone()
    }

    /// Pauses and resumes the vCPUs once they run (see [`VcpuControl`]).
    pub fn vcpu_control(&self) -> VcpuControl {
        self.vcpus.clone()
    }

    /// Guest RAM, for loading a kernel or a payload before start.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The exit latch; requesting a reason on it stops the VM.
    pub fn exit(&self) -> &VmExit {
        &self.exit
    }

    /// Puts `device` behind a virtio-mmio transport in the next free slot, wired to the slot's
    /// IRQ. The returned slot names the base address and IRQ (for the kernel command line)
    /// and shares the transport, for devices that also do host-side I/O.
    pub fn add_virtio_device<D: VirtioDevice + Persist + 'static>(
        &mut self,
        device: D,
    ) -> Result<VirtioSlot<D>, VmError> {
        self.attach(device, None)
    }

    /// Puts a device of a snapshot back in the next free slot with its transport's state.
    pub fn restore_virtio_device<D: VirtioDevice + Persist + 'static>(
        &mut self,
        device: D,
        transport: &TransportState,
    ) -> Result<VirtioSlot<D>, VmError> {
        self.attach(device, Some(transport))
    }

    fn attach<D: VirtioDevice + Persist + 'static>(
        &mut self,
        device: D,
        saved: Option<&TransportState>,
    ) -> Result<VirtioSlot<D>, VmError> {
        let (base, irq) = layout::virtio_slot(self.virtio.len())
            .ok_or_else(|| VmError::Config("no virtio-mmio slot left".into()))?;
        let line = irq_line(&self.vm_fd, irq)?;
        if saved.is_some_and(TransportState::interrupt_pending) {
            self.pending_irqs.push(line.try_clone()?);
        }
        let transport = match saved {
            None => MmioTransport::new(device, self.memory.clone(), line),
            Some(saved) => MmioTransport::from_state(device, self.memory.clone(), line, saved)
                .map_err(|e| VmError::Restore(format!("virtio device at {base:#x}: {e}")))?,
        };
        let transport = Arc::new(Mutex::new(transport));
        self.mmio_bus
            .insert(transport.clone(), base, layout::VIRTIO_MMIO_SLOT)?;
        let saver: Arc<Mutex<dyn SaveTransport>> = transport.clone();
        self.virtio.push(VirtioSource {
            base,
            irq,
            transport: saver,
        });
        Ok(VirtioSlot {
            base,
            irq,
            transport,
        })
    }

    /// Adds a vsock device for guest CID `guest_cid` with its host side at `uds_path`.
    pub fn add_vsock(
        &mut self,
        guest_cid: u64,
        uds_path: &Path,
    ) -> Result<VirtioSlot<Vsock>, VmError> {
        self.attach_with_events(Vsock::new(guest_cid, uds_path)?, None, VsockEvents)
    }

    /// Puts a snapshot's vsock device back, its host side listening at `uds_path`.
    pub fn restore_vsock(
        &mut self,
        guest_cid: u64,
        uds_path: &Path,
        transport: &TransportState,
    ) -> Result<VirtioSlot<Vsock>, VmError> {
        self.attach_with_events(
            Vsock::new(guest_cid, uds_path)?,
            Some(transport),
            VsockEvents,
        )
    }

    /// Adds a network device (its tap already open: before any seccomp filter is installed).
    pub fn add_net(&mut self, net: Net) -> Result<VirtioSlot<Net>, VmError> {
        self.attach_with_events(net, None, NetEvents::new)
    }

    /// Puts a snapshot's network device back, over its reopened tap.
    pub fn restore_net(
        &mut self,
        net: Net,
        transport: &TransportState,
    ) -> Result<VirtioSlot<Net>, VmError> {
        self.attach_with_events(net, Some(transport), NetEvents::new)
    }

    /// Attaches a device whose host side runs on the event loop, in the subscriber that
    /// `events` makes of its transport.
    fn attach_with_events<D, S>(
        &mut self,
        device: D,
        saved: Option<&TransportState>,
        events: fn(Arc<Mutex<MmioTransport<D>>>) -> S,
    ) -> Result<VirtioSlot<D>, VmError>
    where
        D: VirtioDevice + Persist + 'static,
        S: MutEventSubscriber + Send + 'static,
    {
        let slot = self.attach(device, saved)?;
        self.subscribers
            .push(Arc::new(Mutex::new(events(slot.transport.clone()))));
        Ok(slot)
    }

    /// The seccomp filters: the vCPU threads install theirs before their first `KVM_RUN`
    /// (none by default; kindling-vmm's `main` sets its own).
    pub fn set_seccomp(&mut self, filters: Filters) {
        self.seccomp = filters;
    }

    /// Runs `subscriber` on the VMM's event loop once the VM is started.
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        self.subscribers.push(subscriber);
    }

    /// The base address and IRQ of each virtio device added so far.
    pub fn virtio_slots(&self) -> Vec<(u64, u32)> {
        self.virtio.iter().map(|v| (v.base, v.irq)).collect()
    }

    /// The CPUID vCPU `index` gets: the host-supported CPUID, filtered for this vCPU, then
    /// masked by the CPU template.
    pub fn guest_cpuid(&self, index: u8) -> Result<CpuId, VmError> {
        let mut cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let host = cpu::HostCpu {
            tsc_deadline: cpu::HostCpu::tsc_deadline_for_guests(
                self.kvm.check_extension(Cap::TscDeadlineTimer),
            ),
            brand: cpu::HostCpu::brand_of_this_cpu(),
            cache_tlb: cpu::HostCpu::cache_tlb_of_this_cpu(),
        };
        cpu::filter_cpuid(&mut cpuid, index, self.vcpu_count, &host);
        if let Some(template) = &self.cpu_template {
            template.apply(&mut cpuid).map_err(VmError::Config)?;
        }
        Ok(cpuid)
    }

    /// Configures every vCPU for `entry` and starts them. `instance_start` is when the
    /// instance was asked to start: the boot timer and the first-`KVM_RUN` timing count from it.
    pub fn start(self, entry: EntryPoint, instance_start: Instant) -> Result<RunningVm, VmError> {
        cpu::write_boot_tables(&self.memory, entry.user_mode)?;
        match &self.cpu_template {
            Some(t) => tracing::info!("CPU template in use: {}", t.name),
            None => tracing::info!("CPU template in use: none (host CPUID, filtered)"),
        }
        let cpuids = (0..self.vcpu_count)
            .map(|index| self.guest_cpuid(index))
            .collect::<Result<Vec<_>, _>>()?;
        let setup = |index: u8, fd: &VcpuFd| -> Result<(), VmError> {
            fd.set_cpuid2(&cpuids[usize::from(index)])
                .map_err(|e| VmError::Kvm("KVM_SET_CPUID2", e))?;
            cpu::setup_msrs(fd)?;
            cpu::setup_regs(fd, &entry)?;
            cpu::setup_sregs(fd, entry.user_mode)?;
            cpu::setup_fpu(fd)?;
            cpu::setup_lapic(fd)?;
            Ok(())
        };
        self.launch(setup, |_| Ok(()), false, instance_start)
    }

    /// Starts a VM built by [`Self::restore`] from its saved KVM state: paused unless
    /// `run` (Firecracker's `resume_vm`).
    pub fn resume(
        self,
        vm: &VmState,
        vcpus: &[VcpuState],
        run: bool,
        instance_start: Instant,
    ) -> Result<RunningVm, VmError> {
        if vcpus.len() != usize::from(self.vcpu_count) {
            return Err(VmError::Restore(format!(
                "{} vCPU states for {} vCPUs",
                vcpus.len(),
                self.vcpu_count
            )));
        }
        kvm_state::check_xsave_size(&self.kvm)?;
        let setup = |index: u8, fd: &VcpuFd| -> Result<(), VmError> {
            Ok(vcpus[usize::from(index)].restore(fd)?)
        };
        // The VM-wide state (interrupt controllers, kvmclock) after every vCPU's, as QEMU
        // and Firecracker order it.
        let vm_state = |vm_fd: &VmFd| -> Result<(), VmError> { Ok(vm.restore(vm_fd)?) };
        self.launch(setup, vm_state, !run, instance_start)
    }

    /// Creates the vCPUs, sets each up with `setup`, then the VM with `finish`, and starts
    /// them on their threads (parked at once if `paused`) and the device event loop.
    fn launch(
        mut self,
        setup: impl Fn(u8, &VcpuFd) -> Result<(), VmError>,
        finish: impl FnOnce(&VmFd) -> Result<(), VmError>,
        paused: bool,
        instance_start: Instant,
    ) -> Result<RunningVm, VmError> {
        let started = Instant::now();
        let boot_time = BootTime::default();
        self.mmio_bus.insert(
            Arc::new(Mutex::new(BootTimer::new(
                instance_start,
                boot_time.clone(),
            ))),
            layout::BOOT_TIMER_START,
            0x1000,
        )?;
        let msr_indices: Arc<[u32]> = kvm_state::msr_index_list(&self.kvm)?.into();
        let io_bus = Arc::new(self.io_bus);
        let mmio_bus = Arc::new(self.mmio_bus);
        let first_run = Arc::new(OnceLock::new());
        let control = self.vcpus.clone();
        let mut vcpus = Vec::new();
        for index in 0..self.vcpu_count {
            let fd = self
                .vm_fd
                .create_vcpu(u64::from(index))
                .map_err(|e| VmError::Kvm("KVM_CREATE_VCPU", e))?;
            setup(index, &fd)?;
            vcpus.push(Vcpu {
                index,
                fd,
                io_bus: io_bus.clone(),
                mmio_bus: mmio_bus.clone(),
                exit: self.exit.clone(),
                first_run: first_run.clone(),
                control: control.clone(),
                seccomp: self.seccomp.clone(),
                msr_indices: msr_indices.clone(),
            });
        }
        finish(&self.vm_fd)?;
        for line in &self.pending_irqs {
            line.trigger()?;
        }
        if paused {
            // No thread runs yet: this only marks the VM paused, and each parks on start.
            control
                .pause()
                .map_err(|e| VmError::Restore(e.to_string()))?;
        }
        for vcpu in vcpus {
            if let Err(e) = vcpu.spawn() {
                self.exit.request(ExitReason::Stopped);
                control.stop_all();
                return Err(e.into());
            }
        }
        metrics::record_phase("vcpus", started.elapsed());
        let mut events = EventManager::new().map_err(|e| VmError::Events(format!("{e:?}")))?;
        for sub in self.subscribers {
            events.add_subscriber(sub);
        }
        events.add_subscriber(Arc::new(Mutex::new(ExitWatcher(self.exit.clone()))));
        let snapshot_sources = SnapshotSources::new(Sources {
            machine: MachineShape {
                vcpu_count: self.vcpu_count,
                mem_size_mib: self.mem_size_mib,
            },
            vm_fd: self.vm_fd.clone(),
            memory: self.memory.clone(),
            serial: self.serial,
            i8042: self.i8042.0.clone(),
            virtio: self.virtio,
            vcpus: control.clone(),
        });
        Ok(RunningVm {
            ctrl_alt_del: self.i8042,
            snapshot_sources,
            _vm_fd: self.vm_fd,
            events,
            memory: self.memory,
            exit: self.exit,
            vcpus: control,
            instance_start,
            first_run,
            boot_time,
        })
    }
}

/// A virtio device's place in the VM.
#[derive(Debug)]
pub struct VirtioSlot<D: VirtioDevice> {
    pub base: u64,
    pub irq: u32,
    pub transport: Arc<Mutex<MmioTransport<D>>>,
}

/// Wakes the event loop when the VM must stop.
struct ExitWatcher(VmExit);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.event(), EventSet::IN)) {
            tracing::error!("cannot watch the VM exit event: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Only consume the wake-up; `RunningVm::wait` reads the reason.
        let _ = self.0.event().read();
    }
}

/// What a running VM has measured so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timings {
    /// Instance start to the first `KVM_RUN`.
    pub first_kvm_run: Option<Duration>,
    /// Instance start to the guest's boot-timer write.
    pub boot_timer: Option<Duration>,
}

/// A started VM.
pub struct RunningVm {
    ctrl_alt_del: CtrlAltDel,
    snapshot_sources: SnapshotSources,
    _vm_fd: Arc<VmFd>,
    events: EventManager<Subscriber>,
    memory: GuestMemory,
    exit: VmExit,
    vcpus: VcpuControl,
    instance_start: Instant,
    first_run: Arc<OnceLock<Instant>>,
    boot_time: BootTime,
}

impl fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningVm")
            .field("memory", &self.memory)
            .field("exit", &self.exit)
            .field("vcpus", &self.vcpus)
            .field("instance_start", &self.instance_start)
            .field("timings", &self.timings())
            .finish_non_exhaustive()
    }
}

/// What the API may do to a running VM from its own thread.
#[derive(Debug, Clone)]
pub struct VmControls {
    pub ctrl_alt_del: CtrlAltDel,
    pub vcpus: VcpuControl,
    pub snapshotter: Snapshotter,
}

impl RunningVm {
    /// Presses Ctrl-Alt-Del on the guest's keyboard controller.
    pub fn ctrl_alt_del(&self) -> CtrlAltDel {
        self.ctrl_alt_del.clone()
    }

    /// The Ctrl-Alt-Del button, the vCPUs' pause control and snapshots.
    pub fn controls(&self) -> VmControls {
        VmControls {
            ctrl_alt_del: self.ctrl_alt_del.clone(),
            vcpus: self.vcpus.clone(),
            snapshotter: self.snapshot_sources.snapshotter(),
        }
    }

    /// The exit latch: request [`ExitReason::Stopped`] on it to stop the VM from outside.
    pub fn exit(&self) -> &VmExit {
        &self.exit
    }

    /// The VMM process's resident memory in KiB, guest RAM left out.
    pub fn vmm_rss_kib(&self) -> std::io::Result<u64> {
        let guest: Vec<u64> = self.memory.iter().map(|r| r.as_ptr() as u64).collect();
        crate::metrics::vmm_rss_kib(&guest)
    }

    pub fn timings(&self) -> Timings {
        Timings {
            first_kvm_run: self
                .first_run
                .get()
                .map(|t| t.duration_since(self.instance_start)),
            boot_timer: self.boot_time.get().copied(),
        }
    }

    /// Runs the device event loop on this thread until the VM stops, then stops every vCPU
    /// thread and returns why the VM stopped.
    pub fn wait(mut self) -> (ExitReason, Timings) {
        let reason = loop {
            if let Some(reason) = self.exit.reason() {
                break reason;
            }
            if let Err(e) = self.events.run() {
                tracing::error!("event loop: {e:?}");
                self.exit
                    .request(ExitReason::VcpuError(format!("event loop failed: {e:?}")));
            }
        };
        let timings = self.timings();
        self.vcpus.stop_all();
        (reason, timings)
    }
}
