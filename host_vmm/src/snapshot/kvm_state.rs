//! What KVM holds for a VM and its vCPUs, saved and restored through KVM's own get/set ioctls:
//! the in-kernel PIC pair, IOAPIC, PIT and kvmclock; each vCPU's CPUID, registers, XSAVE area,
//! LAPIC, MSRs and pending events. The structures are kvm-bindings' own (serialised as opaque
//! bytes), so nothing is translated on the way.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// A KVM ioctl that failed while saving or restoring.
#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    #[error("KVM {0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    #[error("building a KVM list: {0:?}")]
    List(vmm_sys_util::fam::Error),
    #[error(
        "this host's XSAVE area needs {0} bytes; snapshots carry the 4096-byte KVM_GET_XSAVE area"
    )]
    XsaveTooLarge(usize),
    #[error("KVM_SET_MSRS took {set} of {total} MSRs: MSR {index:#x} was refused")]
    MsrRefused {
        set: usize,
        total: usize,
        index: u32,
    },
}

fn ioctl<T>(name: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, KvmStateError> {
    r.map_err(|e| KvmStateError::Ioctl(name, e))
}

/// The VM-wide interrupt controllers and clock.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

impl VmState {
    /// Reads the state of a VM whose vCPUs are paused.
    pub fn save(vm: &VmFd) -> Result<Self, KvmStateError> {
        let chip = |chip_id| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            ioctl("KVM_GET_IRQCHIP", vm.get_irqchip(&mut chip)).map(|()| chip)
        };
        let mut clock = ioctl("KVM_GET_CLOCK", vm.get_clock())?;
        // Restored as a plain value: the guest's clock resumes where it was saved instead of
        // jumping by the time the snapshot spent on disk (KVM_CLOCK_REALTIME would add it).
        clock.flags = 0;
        Ok(Self {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: ioctl("KVM_GET_PIT2", vm.get_pit2())?,
            clock,
        })
    }

    /// Loads the state into a VM with an in-kernel IRQ chip and PIT, before its vCPUs run.
    pub fn restore(&self, vm: &VmFd) -> Result<(), KvmStateError> {
        ioctl("KVM_SET_PIT2", vm.set_pit2(&self.pit))?;
        ioctl("KVM_SET_CLOCK", vm.set_clock(&self.clock))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            ioctl("KVM_SET_IRQCHIP", vm.set_irqchip(chip))?;
        }
        Ok(())
    }
}

/// One vCPU as KVM holds it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    cpuid: Vec<kvm_cpuid_entry2>,
    msrs: Vec<kvm_msr_entry>,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    /// None where the host has no XSAVE (KVM then has no XCRs and refuses to set them).
    xcrs: Option<kvm_xcrs>,
    debug_regs: kvm_debugregs,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    vcpu_events: kvm_vcpu_events,
}

/// The MSRs KVM saves and restores for its guests (`KVM_GET_MSR_INDEX_LIST`), read once per
/// VM from `/dev/kvm` before the threads are filtered.
pub fn msr_index_list(kvm: &Kvm) -> Result<Vec<u32>, KvmStateError> {
    Ok(ioctl("KVM_GET_MSR_INDEX_LIST", kvm.get_msr_index_list())?
        .as_slice()
        .to_vec())
}

/// Refuses hosts whose XSAVE area outgrows `kvm_xsave`, so that `KVM_SET_XSAVE` never reads
/// past the 4 KiB it is given.
pub fn check_xsave_size(kvm: &Kvm) -> Result<(), KvmStateError> {
    let size = usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    if size > std::mem::size_of::<kvm_xsave>() {
        return Err(KvmStateError::XsaveTooLarge(size));
    }
    Ok(())
}

/// Reads every MSR of `indices` the vCPU has. `KVM_GET_MSRS` stops at the first MSR this
/// vCPU lacks (one the host lists but the guest's CPUID does not enable); that one is
/// skipped and the rest read on.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, KvmStateError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<_> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(KvmStateError::List)?;
        let read = ioctl("KVM_GET_MSRS", fd.get_msrs(&mut msrs))?;
        saved.extend_from_slice(&msrs.as_slice()[..read.min(rest.len())]);
        rest = rest.get(read + 1..).unwrap_or_default();
    }
    Ok(saved)
}

impl VcpuState {
    /// Reads a vCPU that is outside `KVM_RUN` with no I/O left half done (see
    /// `Vcpu::park`). `msr_indices` comes from [`msr_index_list`].
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, KvmStateError> {
        let cpuid = ioctl("KVM_GET_CPUID2", fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?;
        Ok(Self {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: ioctl("KVM_GET_MP_STATE", fd.get_mp_state())?,
            regs: ioctl("KVM_GET_REGS", fd.get_regs())?,
            sregs: ioctl("KVM_GET_SREGS", fd.get_sregs())?,
            xsave: ioctl("KVM_GET_XSAVE", fd.get_xsave())?,
            xcrs: Some(ioctl("KVM_GET_XCRS", fd.get_xcrs())?).filter(|x| x.nr_xcrs > 0),
            debug_regs: ioctl("KVM_GET_DEBUGREGS", fd.get_debug_regs())?,
            lapic: ioctl("KVM_GET_LAPIC", fd.get_lapic())?,
            msrs: read_msrs(fd, msr_indices)?,
            vcpu_events: ioctl("KVM_GET_VCPU_EVENTS", fd.get_vcpu_events())?,
        })
    }

    /// Loads the state into a new vCPU of a VM that passed [`check_xsave_size`]. The order
    /// matters: CPUID first (it decides which state is valid), special registers (the APIC
    /// base) before the LAPIC, the LAPIC (its timer mode) before the MSRs (the TSC deadline),
    /// pending events last.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), KvmStateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(KvmStateError::List)?;
        ioctl("KVM_SET_CPUID2", fd.set_cpuid2(&cpuid))?;
        ioctl("KVM_SET_REGS", fd.set_regs(&self.regs))?;
        ioctl("KVM_SET_SREGS", fd.set_sregs(&self.sregs))?;
        // SAFETY: `check_xsave_size` found that this host's XSAVE area fits `kvm_xsave`, so
        // KVM reads no more than the 4096 bytes of `self.xsave`.
        ioctl("KVM_SET_XSAVE", unsafe { fd.set_xsave(&self.xsave) })?;
        if let Some(xcrs) = &self.xcrs {
            ioctl("KVM_SET_XCRS", fd.set_xcrs(xcrs))?;
        }
        ioctl("KVM_SET_DEBUGREGS", fd.set_debug_regs(&self.debug_regs))?;
        ioctl("KVM_SET_LAPIC", fd.set_lapic(&self.lapic))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(KvmStateError::List)?;
        let set = ioctl("KVM_SET_MSRS", fd.set_msrs(&msrs))?;
        if set < self.msrs.len() {
            return Err(KvmStateError::MsrRefused {
                set,
                total: self.msrs.len(),
                index: self.msrs[set].index,
            });
        }
        ioctl("KVM_SET_MP_STATE", fd.set_mp_state(self.mp_state))?;
        ioctl("KVM_SET_VCPU_EVENTS", fd.set_vcpu_events(&self.vcpu_events))?;
        Ok(())
    }
}
