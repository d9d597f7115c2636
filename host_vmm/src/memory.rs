//! Guest RAM: anonymous mmap-backed regions (vm-memory), split around the 32-bit MMIO hole so
//! that device addresses below 4 GiB never alias RAM.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{FOUR_GIB, MMIO_START};

/// Guest memory as every part of the VMM sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Why guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{0} MiB of guest memory is more than this host can address")]
    TooLarge(u64),
    #[error(transparent)]
    Mmap(#[from] vm_memory::mmap::FromRangesError),
}

/// The RAM regions for `size` bytes of guest memory: one region below the MMIO hole and, if
/// more memory is asked for, the rest from 4 GiB up. `None` if a region's length does not fit
/// the host's `usize`.
pub fn ram_regions(size: u64) -> Option<Vec<(GuestAddress, usize)>> {
    let len = |n: u64| usize::try_from(n).ok();
    Some(if size <= MMIO_START {
        vec![(GuestAddress(0), len(size)?)]
    } else {
        vec![
            (GuestAddress(0), len(MMIO_START)?),
            (GuestAddress(FOUR_GIB), len(size - MMIO_START)?),
        ]
    })
}

/// Allocates `mem_size_mib` MiB of guest RAM.
pub fn create_guest_memory(mem_size_mib: u64) -> Result<GuestMemory, MemoryError> {
    let regions = mem_size_mib
        .checked_mul(1 << 20)
        .and_then(ram_regions)
        .ok_or(MemoryError::TooLarge(mem_size_mib))?;
    Ok(GuestMemoryMmap::from_ranges(&regions)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(
            ram_regions(128 << 20),
            Some(vec![(GuestAddress(0), 128 << 20)])
        );
        let mem = create_guest_memory(16).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((16 << 20) - 1));
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let regions = ram_regions(4 << 30).unwrap();
        let len = |n: u64| usize::try_from(n).unwrap();
        assert_eq!(regions[0], (GuestAddress(0), len(MMIO_START)));
        assert_eq!(
            regions[1],
            (GuestAddress(FOUR_GIB), len((4u64 << 30) - MMIO_START))
        );
    }

    #[test]
    fn a_size_past_the_address_space_is_refused() {
        assert!(matches!(
            create_guest_memory(u64::MAX >> 10),
            Err(MemoryError::TooLarge(_))
        ));
    }
}
