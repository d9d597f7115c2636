//! An Intel MultiProcessor Specification 1.4 table, so that a guest booted without ACPI finds
//! every vCPU, the I/O APIC and the legacy IRQ routing (KVM's in-kernel irqchip: 24 I/O APIC
//! pins, identity-mapped ISA IRQs, PIC on LINT0, NMI on LINT1).

use vm_memory::{Bytes, GuestAddress};

use crate::layout::MPTABLE_START;
use crate::memory::GuestMemory;

const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
const IO_APIC_DEFAULT_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IO_APIC_VERSION: u8 = 0x11;
const IO_APIC_PINS: u8 = 24;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 signature, FPU and APIC present.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CONFIG_HEADER_LEN: usize = 44;
const FLOATING_LEN: usize = 16;

/// Errors writing the table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit an MP table (at most 254)")]
    TooManyCpus(u8),
    #[error("the MP table cannot be placed at {0:#x}: above 4 GiB")]
    Address(u64),
    #[error("writing the MP table")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The table's bytes for `cpus` vCPUs, to be placed at `base`: the floating pointer
/// structure followed by the configuration table.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus + 1;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IO_APIC_VERSION, 1]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_BASE.to_le_bytes());
    count += 2;
    for pin in 0..IO_APIC_PINS {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
        count += 1;
    }

    let config_addr = base + FLOATING_LEN as u64;
    let config_ptr = u32::try_from(config_addr).map_err(|_| MptableError::Address(base))?;
    // At most 254 CPUs keep the table a few KiB long.
    let config_len = u16::try_from(CONFIG_HEADER_LEN + entries.len())
        .map_err(|_| MptableError::TooManyCpus(cpus))?;
    let mut config = Vec::with_capacity(CONFIG_HEADER_LEN + entries.len());
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&config_len.to_le_bytes());
    config.extend_from_slice(&[4, 0]); // spec revision 1.4, checksum (below)
    config.extend_from_slice(b"KINDLING");
    config.extend_from_slice(b"KINDLING-VMM");
    config.extend_from_slice(&[0; 6]); // OEM table pointer and size
    config.extend_from_slice(&count.to_le_bytes());
    config.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    config.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut table = Vec::with_capacity(FLOATING_LEN + config.len());
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&config_ptr.to_le_bytes());
    table.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 16 bytes, rev 1.4, checksum, features
    table[10] = checksum(&table);
    table.extend_from_slice(&config);
    Ok(table)
}

/// Writes the MP table for `cpus` vCPUs at [`MPTABLE_START`].
pub fn setup(mem: &GuestMemory, cpus: u8) -> Result<(), MptableError> {
    mem.write_slice(&build(cpus, MPTABLE_START)?, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::HIMEM_START;

    #[test]
    fn table_is_well_formed_and_fits_below_640k() {
        for cpus in [1u8, 2, 32] {
            let t = build(cpus, MPTABLE_START).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let cfg = &t[16..];
            assert_eq!(&cfg[..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(cfg.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([cfg[34], cfg[35]]);
            assert_eq!(count, u16::from(cpus) + 2 + 24 + 2);
            assert_eq!(cfg[CONFIG_HEADER_LEN + 3], CPU_ENABLED | CPU_BOOTPROCESSOR);
            assert!(MPTABLE_START + t.len() as u64 <= 0xa0000);
            assert!(MPTABLE_START + (t.len() as u64) < HIMEM_START);
        }
        let mem = crate::memory::create_guest_memory(16).unwrap();
        setup(&mem, 4).unwrap();
        let ptr: u32 = mem.read_obj(GuestAddress(MPTABLE_START + 4)).unwrap();
        assert_eq!(u64::from(ptr), MPTABLE_START + 16);
        assert!(build(0, MPTABLE_START).is_err());
        assert!(build(255, MPTABLE_START).is_err());
        assert!(matches!(
            build(1, 1 << 32),
            Err(MptableError::Address(0x1_0000_0000))
        ));
    }
}
