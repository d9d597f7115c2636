//! x86-64 vCPU state for a 64-bit entry: GDT, identity page tables, segment and control
//! registers, FPU, boot MSRs, local APIC LINT pins and the CPUID the guest sees.
//!
//! The same code sets up the Linux 64-bit boot protocol (CPL0) and user-mode (CPL3) payloads:
//! the only differences are the segments loaded, the U/S bit of the page tables and IOPL, which
//! lets a CPL3 payload reach the legacy ports. CPL3 payloads exist because nested KVM on the
//! project's CI machines emulates ring 0 but runs ring 3 natively (see ENVIRONMENT.md).

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START};
use crate::memory::GuestMemory;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("writing boot tables to guest memory")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM vCPU ioctl {0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("building the MSR list: {0:?}")]
    Msrs(vmm_sys_util::fam::Error),
}

/// Where and how a vCPU starts executing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPoint {
    pub rip: u64,
    pub rsp: u64,
    /// Linux's boot protocol passes the zero page here; payloads may pass anything.
    pub rsi: u64,
    /// Start at CPL3 with user segments, user pages and IOPL 3.
    pub user_mode: bool,
}

// GDT entries: Firecracker's boot GDT (null, code, data, TSS) plus user code and data.
const GDT_ENTRIES: u16 = 6;
const GDT: [u64; GDT_ENTRIES as usize] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 64-bit kernel code
    gdt_entry(0xc093, 0, 0xfffff), // kernel data
    gdt_entry(0x808b, 0, 0xfffff), // TSS
    gdt_entry(0xa0fb, 0, 0xfffff), // 64-bit user code, DPL 3
    gdt_entry(0xc0f3, 0, 0xfffff), // user data, DPL 3
];
const KERNEL_CODE: u16 = 1;
const KERNEL_DATA: u16 = 2;
const TSS: u16 = 3;
const USER_CODE: u16 = 4;
const USER_DATA: u16 = 5;

const X86_CR0_PE: u64 = 1;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

const PAGE_PRESENT: u64 = 1;
const PAGE_RW: u64 = 1 << 1;
const PAGE_USER: u64 = 1 << 2;
const PAGE_HUGE: u64 = 1 << 7;
/// Page directories mapped: 4 x 1 GiB covers RAM below the hole and the MMIO hole itself.
const PAGE_DIRECTORIES: u64 = 4;

/// Packs a GDT descriptor from flags (access byte in bits 0-7, G/DB/L/AVL in 12-15).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

/// The KVM segment-register cache matching GDT entry `index` (selector RPL = DPL).
fn segment(index: u16) -> kvm_segment {
    // Descriptor bytes: limit 15:0, base 23:0, access byte, G/DB/L/AVL with limit 19:16,
    // base 31:24.
    let [limit0, limit1, base0, base1, base2, access, flags_limit, base3] =
        GDT[usize::from(index)].to_le_bytes();
    let flags = flags_limit >> 4;
    let g = (flags >> 3) & 1;
    let raw_limit = u32::from_le_bytes([limit0, limit1, flags_limit & 0xf, 0]);
    let dpl = (access >> 5) & 3;
    kvm_segment {
        base: u64::from(u32::from_le_bytes([base0, base1, base2, base3])),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index << 3 | u16::from(dpl),
        type_: access & 0xf,
        present: access >> 7,
        dpl,
        db: (flags >> 2) & 1,
        s: (access >> 4) & 1,
        l: (flags >> 1) & 1,
        g,
        avl: flags & 1,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and identity page tables for the low 4 GiB.
pub fn write_boot_tables(mem: &GuestMemory, user_mode: bool) -> Result<(), CpuError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;
    let flags = PAGE_PRESENT | PAGE_RW | if user_mode { PAGE_USER } else { 0 };
    mem.write_obj(PDPTE_START | flags, GuestAddress(PML4_START))?;
    for pd in 0..PAGE_DIRECTORIES {
        let pd_addr = PDE_START + pd * 0x1000;
        mem.write_obj(pd_addr | flags, GuestAddress(PDPTE_START + pd * 8))?;
        for i in 0..512u64 {
            let phys = ((pd << 9) + i) << 21;
            mem.write_obj(phys | flags | PAGE_HUGE, GuestAddress(pd_addr + i * 8))?;
        }
    }
    Ok(())
}

/// Loads long-mode segment and control registers.
pub fn setup_sregs(vcpu: &VcpuFd, user_mode: bool) -> Result<(), CpuError> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| CpuError::Kvm("KVM_GET_SREGS", e))?;
    let (code, data) = if user_mode {
        (segment(USER_CODE), segment(USER_DATA))
    } else {
        (segment(KERNEL_CODE), segment(KERNEL_DATA))
    };
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = GDT_ENTRIES * 8 - 1;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS);
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(|e| CpuError::Kvm("KVM_SET_SREGS", e))
}

/// Loads the general registers for `entry`.
pub fn setup_regs(vcpu: &VcpuFd, entry: &EntryPoint) -> Result<(), CpuError> {
    let regs = kvm_regs {
        rflags: RFLAGS_RESERVED | if entry.user_mode { RFLAGS_IOPL3 } else { 0 },
        rip: entry.rip,
        rsp: entry.rsp,
        rbp: entry.rsp,
        rsi: entry.rsi,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| CpuError::Kvm("KVM_SET_REGS", e))
}

/// x87 and SSE control words as after a reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| CpuError::Kvm("KVM_SET_FPU", e))
}

/// The MSRs Linux expects a bootloader to leave sane: syscall MSRs cleared, fast strings on,
/// MTRRs enabled with write-back as the default type.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let msrs = Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ])
    .map_err(CpuError::Msrs)?;
    vcpu.set_msrs(&msrs)
        .map_err(|e| CpuError::Kvm("KVM_SET_MSRS", e))?;
    Ok(())
}

/// Routes the local APIC's LINT0 to ExtINT (the PIC) and LINT1 to NMI, as a BIOS would.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), CpuError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| CpuError::Kvm("KVM_GET_LAPIC", e))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        // The register page is `c_char`s: same bits, taken as bytes.
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i].to_ne_bytes()[0]);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[reg + i] = std::ffi::c_char::from_ne_bytes([b]);
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| CpuError::Kvm("KVM_SET_LAPIC", e))
}

/// What the host offers beyond `KVM_GET_SUPPORTED_CPUID` that a guest should see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCpu {
    /// The guest may use the LAPIC's TSC-deadline timer: KVM emulates it
    /// (`KVM_CAP_TSC_DEADLINE_TIMER`, which its supported CPUID never advertises: the VMM
    /// must, as Firecracker does) and the host is bare metal or a VM whose CPU has the timer
    /// too. Inside the nested harness's emulated AMD host (no such timer) it cut a guest's
    /// boot to 0.4× but left L1 with its own LAPIC timer interrupt pending and never taken
    /// (QEMU TCG 7.2 and 10; with L1 on `idle=poll` too, so not a lost wake-up from HLT),
    /// so there the guest keeps the plain LAPIC timer. Bare-metal AMD CPUs lack the timer
    /// too; their guests get it.
    pub tsc_deadline: bool,
    /// The processor brand string (leaves 0x8000_0002..=4), as the host's CPUID reads it.
    pub brand: [[u32; 4]; 3],
    /// The L1 and L2/L3 cache and TLB leaves (0x8000_0005 and 0x8000_0006), as the host's
    /// CPUID reads them, passed as Firecracker passes them: as the nested harness's KVM
    /// passed them, its guests found no TLB entries for 2 MiB pages.
    /// `None` where the host's CPUID stops short of them.
    pub cache_tlb: Option<[[u32; 4]; 2]>,
}

impl HostCpu {
    /// Whether the CPU this runs on has the TSC-deadline timer (leaf 1, ECX bit 24).
    #[must_use]
    pub fn this_cpu_has_tsc_deadline() -> bool {
        std::arch::x86_64::__cpuid(1).ecx & (1 << 24) != 0
    }

    /// Whether guests get the TSC-deadline timer (see [`HostCpu::tsc_deadline`]), given
    /// whether KVM emulates it.
    #[must_use]
    pub fn tsc_deadline_for_guests(kvm_emulates_it: bool) -> bool {
        const ECX_HYPERVISOR: u32 = 1 << 31;
        let bare_metal = std::arch::x86_64::__cpuid(1).ecx & ECX_HYPERVISOR == 0;
        kvm_emulates_it && (bare_metal || Self::this_cpu_has_tsc_deadline())
    }

    /// The brand string leaves of the CPU this runs on.
    #[must_use]
    pub fn brand_of_this_cpu() -> [[u32; 4]; 3] {
        leaves_of_this_cpu(LEAF_BRAND_FIRST)
    }

    /// The cache and TLB leaves of the CPU this runs on (see [`HostCpu::cache_tlb`]), with
    /// leaf 0x8000_0006's reserved EDX bits 17:16 cleared, as KVM clears them.
    #[must_use]
    pub fn cache_tlb_of_this_cpu() -> Option<[[u32; 4]; 2]> {
        let max_extended = std::arch::x86_64::__cpuid(0x8000_0000).eax;
        (max_extended >= LEAF_L2_CACHE_TLB).then(|| {
            let mut leaves = leaves_of_this_cpu(LEAF_L1_CACHE_TLB);
            leaves[1][3] &= !(3 << 16);
            leaves
        })
    }
}

/// `N` consecutive CPUID leaves from `first`, as the CPU this runs on reads them.
fn leaves_of_this_cpu<const N: usize>(first: u32) -> [[u32; 4]; N] {
    std::array::from_fn(|i| {
        let leaf = first + u32::try_from(i).unwrap_or(0);
        let r = std::arch::x86_64::__cpuid(leaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    })
}

const LEAF_BRAND_FIRST: u32 = 0x8000_0002;
const LEAF_BRAND_LAST: u32 = 0x8000_0004;
const LEAF_L1_CACHE_TLB: u32 = 0x8000_0005;
const LEAF_L2_CACHE_TLB: u32 = 0x8000_0006;

/// Who made the CPU, from leaf 0's vendor string (which KVM passes from the host): the cache
/// and topology leaves differ between the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vendor {
    Intel,
    /// AMD, and Hygon (AMD's design, AMD's leaves).
    Amd,
    Other,
}

impl Vendor {
    fn of(cpuid: &CpuId) -> Vendor {
        const GENUINE_INTEL_EBX: u32 = u32::from_le_bytes(*b"Genu");
        const AUTHENTIC_AMD_EBX: u32 = u32::from_le_bytes(*b"Auth");
        const HYGON_GENUINE_EBX: u32 = u32::from_le_bytes(*b"Hygo");
        match cpuid.as_slice().iter().find(|e| e.function == 0) {
            Some(e) if e.ebx == GENUINE_INTEL_EBX => Vendor::Intel,
            Some(e) if e.ebx == AUTHENTIC_AMD_EBX || e.ebx == HYGON_GENUINE_EBX => Vendor::Amd,
            _ => Vendor::Other,
        }
    }
}

/// Sets bits `low..=high` of `reg` to `value` (which must fit: callers pass vCPU counts and
/// indexes, at most 255, into fields of 8 bits or more).
fn set_bits(reg: &mut u32, low: u32, high: u32, value: u32) {
    let mask = (u32::MAX >> (31 - (high - low))) << low;
    *reg = (*reg & !mask) | ((value << low) & mask);
}

/// Tailors the host-supported CPUID for vCPU `index` of `count`, as Firecracker normalises
/// it, so that the guest's idea of its CPU matches the VM rather than the host:
/// - leaf 1 and 0xB: APIC ids, logical processor count, the hypervisor bit, and the
///   TSC-deadline timer where [`HostCpu::tsc_deadline`] says (without it Linux checks the
///   legacy timer through the PIT, slowly);
/// - the brand string where KVM leaves it empty (else the guest calls its CPU "AMD 17/01");
/// - the L1 and L2/L3 cache and TLB leaves (0x8000_0005/6) from the host's CPUID, as
///   Firecracker passes them, where the host has them;
/// - the cache and topology leaves (Intel's 4, AMD's 0x8000_0008, 0x8000_001D and
///   0x8000_001E), which KVM passes from the host as they are: one core per vCPU, no SMT,
///   all vCPUs in one package sharing the last-level cache, instead of the host's core and
///   thread counts (a 1-vCPU guest would otherwise see its L3 shared with a sibling that
///   does not exist).
///
/// Intel's descriptor leaf 2 and the hypervisor leaves (0x4000_0000 "KVMKVMKVM",
/// 0x4000_0001's paravirtual features) stay as KVM reports them: the host's TLBs, and KVM
/// itself, which is what the guest runs on.
pub fn filter_cpuid(cpuid: &mut CpuId, index: u8, count: u8, host: &HostCpu) {
    const LEAF_FEATURES: u32 = 1;
    const LEAF_CACHE_PARAMS: u32 = 4;
    const LEAF_TOPOLOGY: u32 = 0xb;
    const LEAF_AMD_SIZES: u32 = 0x8000_0008;
    const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
    const LEAF_AMD_PROCESSOR_TOPOLOGY: u32 = 0x8000_001e;
    const ECX_TSC_DEADLINE: u32 = 1 << 24;
    const ECX_HYPERVISOR: u32 = 1 << 31;
    const EDX_HTT: u32 = 1 << 28;
    const LAST_LEVEL: u32 = 3;
    let vendor = Vendor::of(cpuid);
    let (index, others) = (u32::from(index), u32::from(count.saturating_sub(1)));
    // Logical processors sharing a cache of `level`, less one: the last level is shared by
    // every vCPU, the others by none (no SMT).
    let sharing = |level: u32| if level == LAST_LEVEL { others } else { 0 };
    for entry in cpuid.as_mut_slice() {
        match (entry.function, vendor) {
            (LEAF_FEATURES, _) => {
                entry.ebx = (entry.ebx & 0xffff) | (index << 24) | (u32::from(count) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if host.tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            (LEAF_TOPOLOGY, _) => entry.edx = index,
            // One subleaf per cache until type 0: EAX bits 7:5 its level, 25:14 the logical
            // processors sharing it less one; Intel's 31:26, the cores in the package less one.
            (LEAF_CACHE_PARAMS, Vendor::Intel) | (LEAF_AMD_CACHE_TOPOLOGY, Vendor::Amd)
                if entry.eax & 0x1f != 0 =>
            {
                let level = (entry.eax >> 5) & 7;
                set_bits(&mut entry.eax, 14, 25, sharing(level));
                if entry.function == LEAF_CACHE_PARAMS {
                    set_bits(&mut entry.eax, 26, 31, others);
                }
            }
            // ECX: the number of threads in the package less one (NC); APIC id bits stay.
            (LEAF_AMD_SIZES, Vendor::Amd) => set_bits(&mut entry.ecx, 0, 7, others),
            // Extended APIC id, compute unit (core) id and one thread per unit; one node.
            (LEAF_AMD_PROCESSOR_TOPOLOGY, Vendor::Amd) => {
                (entry.eax, entry.ebx, entry.ecx) = (index, index, 0);
            }
            (leaf @ (LEAF_L1_CACHE_TLB | LEAF_L2_CACHE_TLB), _) => {
                if let Some(leaves) = host.cache_tlb {
                    let [eax, ebx, ecx, edx] = leaves[usize::from(leaf == LEAF_L2_CACHE_TLB)];
                    (entry.eax, entry.ebx, entry.ecx, entry.edx) = (eax, ebx, ecx, edx);
                }
            }
            (leaf @ LEAF_BRAND_FIRST..=LEAF_BRAND_LAST, _) => {
                let empty = [entry.eax, entry.ebx, entry.ecx, entry.edx] == [0; 4];
                let brand = usize::try_from(leaf - LEAF_BRAND_FIRST)
                    .ok()
                    .and_then(|i| host.brand.get(i));
                if let (true, Some(&[eax, ebx, ecx, edx])) = (empty, brand) {
                    (entry.eax, entry.ebx, entry.ecx, entry.edx) = (eax, ebx, ecx, edx);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let cs = segment(KERNEL_CODE);
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.dpl, cs.s),
            (0x08, 0xb, 1, 0, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ucs = segment(USER_CODE);
        assert_eq!((ucs.selector, ucs.dpl, ucs.l), (0x23, 3, 1));
        let uds = segment(USER_DATA);
        assert_eq!((uds.selector, uds.dpl, uds.db, uds.type_), (0x2b, 3, 1, 3));
        assert_eq!(segment(TSS).type_, 0xb);
        for index in 1..GDT_ENTRIES {
            let s = segment(index);
            assert_eq!((s.base, s.limit, s.present, s.g), (0, 0xffff_ffff, 1, 1));
            assert_eq!(s.avl, 0);
        }
        let kds = segment(KERNEL_DATA);
        assert_eq!(
            (kds.selector, kds.type_, kds.db, kds.l, kds.dpl),
            (0x10, 3, 1, 0, 0)
        );
    }

    #[test]
    fn set_bits_replaces_only_its_field() {
        let mut reg = u32::MAX;
        set_bits(&mut reg, 14, 25, 2);
        assert_eq!(reg, 0xfc00_3fff | (2 << 14));
        set_bits(&mut reg, 26, 31, 0x3f);
        assert_eq!(reg >> 26, 0x3f);
        set_bits(&mut reg, 0, 7, 0x1ff);
        assert_eq!(reg & 0xff, 0xff, "a value too wide is cut to the field");
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let mem = crate::memory::create_guest_memory(2).unwrap();
        write_boot_tables(&mem, true).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 0x7);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 24)).unwrap();
        assert_eq!(pdpt3, (PDE_START + 0x3000) | 0x7);
        // 0xd000_0000 is PD 3, entry 0x80.
        let pde: u64 = mem
            .read_obj(GuestAddress(PDE_START + 0x3000 + 0x80 * 8))
            .unwrap();
        assert_eq!(pde, 0xd000_0000 | 0x87);
        write_boot_tables(&mem, false).unwrap();
        let pde0: u64 = mem.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(pde0, (1 << 21) | 0x83);
    }
}
