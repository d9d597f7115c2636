//! Guest RAM: anonymous mmap-backed regions (vm-memory), split around the 32-bit MMIO hole so
//! that device addresses below 4 GiB never alias RAM.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{FOUR_GIB, MMIO_START};

/// Guest memory as every part of the VMM sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// The RAM regions for `size` bytes of guest memory: one region below the MMIO hole and, if
/// more memory is asked for, the rest from 4 GiB up.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_START as usize),
            (GuestAddress(FOUR_GIB), (size - MMIO_START) as usize),
        ]
    }
}

/// Allocates `mem_size_mib` MiB of guest RAM.
pub fn create_guest_memory(
    mem_size_mib: u64,
) -> Result<GuestMemory, vm_memory::mmap::FromRangesError> {
    GuestMemoryMmap::from_ranges(&ram_regions(mem_size_mib << 20))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let mem = create_guest_memory(16).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((16 << 20) - 1));
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let regions = ram_regions(4 << 30);
        assert_eq!(regions[0], (GuestAddress(0), MMIO_START as usize));
        assert_eq!(
            regions[1],
            (GuestAddress(FOUR_GIB), ((4u64 << 30) - MMIO_START) as usize)
        );
    }
}
