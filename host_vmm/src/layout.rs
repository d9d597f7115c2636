//! The guest-physical address map. The numbers follow Firecracker's x86-64 layout so that a
//! guest kernel and init built for Firecracker (boot timer at 0xd000_0000, virtio-mmio slots
//! above it) work unchanged.

/// GDT written by the VMM for the 64-bit entry (Firecracker's `BOOT_GDT_OFFSET`).
pub const GDT_START: u64 = 0x500;
/// An empty IDT: the guest installs its own before enabling interrupts.
pub const IDT_START: u64 = 0x520;
/// The `boot_params` ("zero page") of the Linux 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, one PDPT and four page directories (4 GiB of 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted (Linux x86's `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The MP table lives in the EBDA-like area below 640 KiB.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of conventional low memory.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables, RSDP first, in the BIOS area (0xe0000..1 MiB) where kernels look for the RSDP.
pub const ACPI_START: u64 = 0xe_0000;
/// Kernels are loaded from 1 MiB up.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole: nothing of guest RAM lives in [MMIO_START, 4 GiB).
pub const MMIO_START: u64 = 0xd000_0000;
/// Size of the MMIO hole.
pub const MMIO_SIZE: u64 = FOUR_GIB - MMIO_START;
/// 4 GiB.
pub const FOUR_GIB: u64 = 1 << 32;

/// The boot timer: one 4 KiB MMIO page; the guest's init writes [`BOOT_TIMER_MAGIC`] to it.
pub const BOOT_TIMER_START: u64 = MMIO_START;
/// The byte the guest writes once it reaches userspace (Firecracker's value).
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// virtio-mmio devices occupy 4 KiB slots from here up.
pub const VIRTIO_MMIO_START: u64 = MMIO_START + 0x1000;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SLOT: u64 = 0x1000;
/// The first IRQ handed to a virtio-mmio device; the next device gets the next one.
pub const VIRTIO_IRQ_START: u32 = 5;

/// Port and IRQ of the 8250 UART (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// Ports of the i8042 keyboard controller (data 0x60 .. command 0x64).
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
/// The keyboard IRQ of the i8042.
pub const KEYBOARD_IRQ: u32 = 1;

/// Where KVM puts the TSS and identity map on Intel (three pages below the BIOS area).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// The slot of the `index`-th virtio-mmio device: its base address and IRQ; `None` past the
/// last address or IRQ number.
pub fn virtio_slot(index: usize) -> Option<(u64, u32)> {
    let index = u32::try_from(index).ok()?;
    let base = VIRTIO_MMIO_SLOT
        .checked_mul(u64::from(index))?
        .checked_add(VIRTIO_MMIO_START)?;
    Some((base, VIRTIO_IRQ_START.checked_add(index)?))
}
