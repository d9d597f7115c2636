//! ACPI tables for a hardware-reduced microVM, the set Firecracker writes since 1.8, built
//! with rust-vmm's `acpi_tables`: RSDP → XSDT → FADT (hardware-reduced, with an i8042) and
//! MADT (a local APIC per vCPU, the IOAPIC); the FADT points at a DSDT describing COM1, the
//! i8042 and each virtio-mmio device (`LNRO0005`). A distribution kernel finds its devices
//! there instead of on the command line or in an MP table; Kindling's minimal kernel, built
//! without ACPI, ignores them.
//!
//! The tables live from [`layout::ACPI_START`] in the BIOS area below 1 MiB, which the e820
//! map never offers as RAM; the zero page's `acpi_rsdp_addr` points at the RSDP, which also
//! sits where a kernel scanning for it looks.

use acpi_tables::aml::{self, Device, EISAName, Interrupt, Memory32Fixed, Name, Path, IO};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"KNDLNG";
const OEM_REVISION: u32 = 1;

/// `IAPC_BOOT_ARCH` (ACPI 6.5 §5.2.9.3): an 8042 is present (Linux's i8042 driver otherwise
/// assumes none on a hardware-reduced machine); no VGA, no MSI, no CMOS RTC to probe.
const BOOT_ARCH_8042: u16 = 1 << 1;
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Where KVM's in-kernel LAPIC and IOAPIC answer.
const LAPIC_ADDRESS: u32 = 0xfee0_0000;
const IOAPIC_ADDRESS: u32 = 0xfec0_0000;

/// Why the tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables need {0} bytes, more than the BIOS area holds")]
    TooLarge(u64),
    #[error("a virtio-mmio device at {0:#x} is above 4 GiB")]
    DeviceAddress(u64),
    #[error("writing the ACPI tables: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The machine the tables describe.
#[derive(Debug, Clone)]
pub struct Machine<'a> {
    pub vcpu_count: u8,
    /// Each virtio-mmio device's base address and IRQ.
    pub virtio: &'a [(u64, u32)],
}

/// Bytes of AML a table or object serialises to.
fn aml_bytes(object: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    object.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT: COM1, the i8042 and the virtio-mmio devices.
fn dsdt(machine: &Machine<'_>) -> Result<Vec<u8>, AcpiError> {
    let mut body = Vec::new();
    // Each device is serialised in the statement that builds it: AML objects borrow their
    // children, which live only that long.
    Device::new(
        Path::new("_SB_.COM1"),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_DDN".into(), &"COM1"),
            &Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &Interrupt::new(true, true, false, false, layout::SERIAL_IRQ),
                    &IO::new(layout::SERIAL_PORT, layout::SERIAL_PORT, 1, 8),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    Device::new(
        Path::new("_SB_.PS2_"),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0303")),
            &Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &IO::new(layout::I8042_PORT, layout::I8042_PORT, 1, 1),
                    &IO::new(layout::I8042_PORT + 4, layout::I8042_PORT + 4, 1, 1),
                    &Interrupt::new(true, true, false, false, layout::KEYBOARD_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    for (index, &(base, irq)) in machine.virtio.iter().enumerate() {
        let base32 = u32::try_from(base).map_err(|_| AcpiError::DeviceAddress(base))?;
        let slot = u32::try_from(layout::VIRTIO_MMIO_SLOT).unwrap_or(u32::MAX);
        Device::new(
            Path::new(&format!("_SB_.V{index:03X}")),
            vec![
                &Name::new("_HID".into(), &"LNRO0005"),
                &Name::new("_UID".into(), &index),
                &Name::new("_CCA".into(), &aml::ONE),
                &Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &Memory32Fixed::new(true, base32, slot),
                        &Interrupt::new(true, true, false, false, irq),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"KNDLDSDT", OEM_REVISION);
    table.append_slice(&body);
    Ok(table.as_slice().to_vec())
}

fn fadt(dsdt_address: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"KNDLFACP", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_address);
    fadt.iapc_boot_arch = (BOOT_ARCH_8042
        | BOOT_ARCH_VGA_NOT_PRESENT
        | BOOT_ARCH_MSI_NOT_SUPPORTED
        | BOOT_ARCH_CMOS_RTC_NOT_PRESENT)
        .into();
    aml_bytes(&fadt.finalize())
}

fn madt(vcpu_count: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"KNDLAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDRESS),
    );
    for id in 0..vcpu_count {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDRESS, 0));
    aml_bytes(&madt)
}

/// Lays the tables out one after the other (8-byte aligned) from `start`.
struct Placer {
    next: u64,
    tables: Vec<(u64, Vec<u8>)>,
}

impl Placer {
    fn place(&mut self, table: Vec<u8>) -> u64 {
        let address = self.next;
        self.next = (address + table.len() as u64).next_multiple_of(8);
        self.tables.push((address, table));
        address
    }
}

/// Writes the tables for `machine` into guest memory; returns the RSDP's address.
pub fn write_tables(mem: &GuestMemory, machine: &Machine<'_>) -> Result<u64, AcpiError> {
    let rsdp_address = layout::ACPI_START;
    let mut placer = Placer {
        next: (rsdp_address + Rsdp::len() as u64).next_multiple_of(8),
        tables: Vec::new(),
    };
    let dsdt = placer.place(dsdt(machine)?);
    let fadt = placer.place(fadt(dsdt));
    let madt = placer.place(madt(machine.vcpu_count));
    let mut xsdt = XSDT::new(OEM_ID, *b"KNDLXSDT", OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = placer.place(aml_bytes(&xsdt));
    if placer.next > layout::HIMEM_START {
        return Err(AcpiError::TooLarge(placer.next - rsdp_address));
    }
    mem.write_slice(
        &aml_bytes(&Rsdp::new(OEM_ID, xsdt)),
        GuestAddress(rsdp_address),
    )?;
    for (address, table) in placer.tables {
        mem.write_slice(&table, GuestAddress(address))?;
    }
    Ok(rsdp_address)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn read(mem: &GuestMemory, address: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        mem.read_slice(&mut bytes, GuestAddress(address)).unwrap();
        bytes
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    /// Reads the table at `address`, checking its signature and checksum.
    fn table(mem: &GuestMemory, address: u64, signature: &[u8; 4]) -> Vec<u8> {
        let header = read(mem, address, 36);
        assert_eq!(&header[..4], signature);
        let bytes = read(mem, address, u32_at(&header, 4) as usize);
        let sum = bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        assert_eq!(sum, 0, "{} checksum", String::from_utf8_lossy(signature));
        bytes
    }

    #[test]
    fn rsdp_leads_through_xsdt_to_fadt_madt_and_dsdt() {
        let mem = create_guest_memory(64).unwrap();
        let virtio = [(0xd000_1000, 5), (0xd000_2000, 6)];
        let rsdp_address = write_tables(
            &mem,
            &Machine {
                vcpu_count: 2,
                virtio: &virtio,
            },
        )
        .unwrap();
        assert_eq!(rsdp_address % 16, 0, "scanners look on 16-byte boundaries");
        let rsdp = read(&mem, rsdp_address, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let xsdt = table(&mem, u64_at(&rsdp, 24), b"XSDT");
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
        assert_eq!(entries.len(), 2);

        let fadt = table(&mem, entries[0], b"FACP");
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0, "hardware-reduced");
        assert_ne!(
            u32_at(&fadt, 109) & u32::from(BOOT_ARCH_8042),
            0,
            "has an 8042"
        );
        let dsdt = table(&mem, u64_at(&fadt, 140), b"DSDT");
        let aml = String::from_utf8_lossy(&dsdt[36..]).into_owned();
        assert!(aml.contains("LNRO0005") && aml.contains("COM1") && aml.contains("PS2_"));
        assert!(aml.contains("V000") && aml.contains("V001") && !aml.contains("V002"));

        let madt = table(&mem, entries[1], b"APIC");
        assert_eq!(u32_at(&madt, 36), LAPIC_ADDRESS);
        // Two local APICs (type 0, 8 bytes) and one IOAPIC (type 1, 12 bytes).
        let kinds: Vec<u8> = {
            let mut kinds = Vec::new();
            let mut at = 44;
            while at < madt.len() {
                kinds.push(madt[at]);
                at += usize::from(madt[at + 1]);
            }
            kinds
        };
        assert_eq!(kinds, [0, 0, 1]);
        assert!(u64_at(&rsdp, 24) + xsdt.len() as u64 <= layout::HIMEM_START);
    }
}
