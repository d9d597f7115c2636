//! Guest RAM: mmap-backed regions (vm-memory), split around the 32-bit MMIO hole so that
//! device addresses below 4 GiB never alias RAM.
//!
//! Every region is mapped at a host address aligned to 2 MiB, the x86 huge page, like its
//! guest address: KVM maps guest memory with 2 MiB nested page table entries only where
//! the host address and the guest address agree modulo 2 MiB (and the host backs the
//! range with a huge page), and each entry it maps 4 KiB at a time instead is one more
//! exit to the VMM's kernel on the guest's first touch. Anonymous RAM asks for transparent
//! huge pages (`MADV_HUGEPAGE`, for hosts whose THP setting is `madvise`).
//!
//! The mappings live as long as the process (kindling-vmm runs one VM): vm-memory gets
//! them as raw, unowned mappings and never unmaps them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::ptr::null_mut;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::layout::{FOUR_GIB, MMIO_START};

/// Guest memory as every part of the VMM sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// The x86 huge page, which guest RAM is aligned to on the host.
pub const HUGE_PAGE: usize = 2 << 20;

/// Why guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{0} MiB of guest memory is more than this host can address")]
    TooLarge(u64),
    #[error("mapping guest memory: {0}")]
    Map(#[from] std::io::Error),
    #[error("guest memory: {0}")]
    Regions(String),
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

/// Allocates `mem_size_mib` MiB of anonymous guest RAM.
pub fn create_guest_memory(mem_size_mib: u64) -> Result<GuestMemory, MemoryError> {
    let regions = mem_size_mib
        .checked_mul(1 << 20)
        .and_then(ram_regions)
        .ok_or(MemoryError::TooLarge(mem_size_mib))?;
    let mut mapped = Vec::with_capacity(regions.len());
    for (base, len) in regions {
        let ram = reserve_aligned(len)?;
        ram.map_anonymous(0, len)?;
        mapped.push(ram.into_region(base)?);
    }
    GuestMemory::from_regions(mapped).map_err(|e| MemoryError::Regions(e.to_string()))
}

/// A range of address space aligned to [`HUGE_PAGE`], reserved for the process's lifetime,
/// into which parts of guest RAM are mapped.
#[derive(Debug)]
pub struct AlignedRam {
    start: *mut u8,
    len: usize,
}

/// Reserves `len` bytes of address space (no memory) at an address aligned to
/// [`HUGE_PAGE`].
pub fn reserve_aligned(len: usize) -> Result<AlignedRam, MemoryError> {
    let span = len
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| MemoryError::Regions(format!("{len} bytes")))?;
    // SAFETY: a fresh mapping at an address of the kernel's choosing: no existing memory
    // is touched. It is inaccessible until parts of it are mapped again below.
    let base = unsafe {
        libc::mmap(
            null_mut(),
            span,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().into());
    }
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    let end = start + len;
    // SAFETY: both ranges are the slack of the reservation just made, outside
    // [start, end), and nothing refers to them.
    unsafe {
        if start > base {
            libc::munmap(base as *mut libc::c_void, start - base);
        }
        if base + span > end {
            libc::munmap(end as *mut libc::c_void, base + span - end);
        }
    }
    Ok(AlignedRam {
        start: start as *mut u8,
        len,
    })
}

impl AlignedRam {
    /// The address `offset` bytes in, after checking that `[offset, offset + len)` lies
    /// within the reservation.
    fn at(&self, offset: usize, len: usize) -> Result<*mut libc::c_void, MemoryError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.start.wrapping_add(offset).cast()),
            _ => Err(MemoryError::Regions(format!(
                "{len} bytes at {offset:#x} are outside a region of {} bytes",
                self.len
            ))),
        }
    }

    /// Maps fresh anonymous memory (zeroes, transparent huge pages where the host has
    /// them) over `[offset, offset + len)`.
    pub fn map_anonymous(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        let addr = self.map_fixed(offset, len, None)?;
        // SAFETY: advice on the mapping just made. Without THP the advice fails, and the
        // memory works the same in 4 KiB pages.
        unsafe { libc::madvise(addr, len, libc::MADV_HUGEPAGE) };
        Ok(())
    }

    /// Maps `len` bytes of `file` from `file_offset` privately (copy-on-write: the file is
    /// never written) over `[offset, offset + len)`.
    pub fn map_file(
        &self,
        offset: usize,
        len: usize,
        file: &File,
        file_offset: u64,
    ) -> Result<(), MemoryError> {
        self.map_fixed(offset, len, Some((file, file_offset)))
            .map(|_| ())
    }

    /// Maps `[offset, offset + len)` of the reservation readable, writable and private:
    /// `file` from its offset, or anonymous memory without one. Returns the address.
    fn map_fixed(
        &self,
        offset: usize,
        len: usize,
        file: Option<(&File, u64)>,
    ) -> Result<*mut libc::c_void, MemoryError> {
        use std::os::fd::AsRawFd;
        let addr = self.at(offset, len)?;
        let (flags, fd, file_offset) = match file {
            Some((file, at)) => (
                0,
                file.as_raw_fd(),
                libc::off_t::try_from(at)
                    .map_err(|_| MemoryError::Regions(format!("file offset {at}")))?,
            ),
            None => (libc::MAP_ANONYMOUS, -1, 0),
        };
        // SAFETY: MAP_FIXED over part of this reservation (checked by `at`), which nothing
        // else maps; vm-memory has not been handed the range yet, so no reference into it
        // exists. A file stays open for the call and the mapping keeps its own reference.
        let mapped = unsafe {
            libc::mmap(
                addr,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_FIXED | flags,
                fd,
                file_offset,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(addr)
    }

    /// Replaces `[offset, offset + len)` by anonymous memory holding the same bytes of
    /// `file` from `file_offset`: read now, in huge pages where the host has them, instead
    /// of faulted in from the file one 4 KiB page at a time when the guest touches it.
    pub fn copy_in(
        &self,
        offset: usize,
        len: usize,
        file: &File,
        file_offset: u64,
    ) -> Result<(), MemoryError> {
        self.map_anonymous(offset, len)?;
        let addr = self.at(offset, len)?;
        // SAFETY: `[addr, addr + len)` is the readable, writable anonymous mapping just
        // made, which nothing else refers to until this slice is dropped.
        let bytes = unsafe { std::slice::from_raw_parts_mut(addr.cast::<u8>(), len) };
        file.read_exact_at(bytes, file_offset)?;
        Ok(())
    }

    /// The reservation as guest RAM at `base`, once everything in it is mapped.
    pub fn into_region(self, base: GuestAddress) -> Result<GuestRegionMmap, MemoryError> {
        // SAFETY: `start` is the page-aligned start of `len` bytes mapped readable and
        // writable, never unmapped (see the module doc), so the region stays valid for as
        // long as vm-memory may use it.
        let region = unsafe { MmapRegionBuilder::new(self.len).with_raw_mmap_pointer(self.start) }
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Regions(e.to_string()))?;
        GuestRegionMmap::new(region, base)
            .ok_or_else(|| MemoryError::Regions(format!("a region at {:#x}", base.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

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
    fn guest_ram_is_aligned_to_huge_pages_on_the_host() {
        let mem = create_guest_memory(6).unwrap();
        let region = mem.iter().next().unwrap();
        assert_eq!(region.as_ptr() as usize % HUGE_PAGE, 0);
        mem.write_obj(0x5au8, GuestAddress((6 << 20) - 1)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 0);
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
