//! A snapshot's working set (record and prefetch, as REAP does for Firecracker): the
//! parts of its memory file that a restored guest touches on its way to its first answer.
//!
//! A restored guest's memory is mapped privately from the memory file, so each page it
//! touches costs a nested page fault, 4 KiB at a time (the file's pages are not huge
//! pages), where a booted guest's anonymous memory is faulted in 2 MiB at a time. The
//! first VM restored from a snapshot records, once its first invocation is answered and
//! it is paused, which 2 MiB chunks of the file its VMM has mapped (pages present in its
//! page tables: read from the file, or copied on write), from the host's side
//! (`/proc/<pid>/maps` and `pagemap`, the mapping found by the file's device and inode).
//! Later restores hand those ranges to kindling-vmm (`prefetch`, Kindling's addition to
//! `PUT /snapshot/load`), which reads them into anonymous huge pages before the guest
//! runs. The rest of the file stays mapped lazily: a restore still does not read the
//! whole file, and never writes it.
//!
//! The record lives beside the snapshot (root's, read-only for all, like its other files)
//! and goes with it when the snapshot is replaced or discarded.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};

/// The chunk a page's touch brings in: the huge page KVM maps at once.
const CHUNK: u64 = 2 << 20;
/// The host's page, pagemap's unit.
const PAGE: u64 = 4096;
/// The most ranges a record keeps, in file order (kindling-vmm's API takes requests of
/// up to 64 KiB).
const MAX_RANGES: usize = 1024;
/// pagemap: the page is present in RAM, or swapped out.
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;

/// What a record found, for the log.
#[derive(Debug, PartialEq, Eq)]
pub struct Recorded {
    /// Pages of the memory file the VM had mapped.
    pub pages: u64,
    /// 2 MiB chunks holding them: the bytes later restores read at once.
    pub bytes: u64,
}

/// Records which 2 MiB chunks of `memory` (a snapshot's memory file) the process `pid`
/// has pages of mapped, into `into` (replaced whole, read-only for all).
pub fn record(pid: u32, memory: &Path, into: &Path) -> anyhow::Result<Recorded> {
    let file = std::fs::metadata(memory).with_context(|| memory.display().to_string())?;
    let (major, minor) = (libc::major(file.dev()), libc::minor(file.dev()));
    let maps_path = format!("/proc/{pid}/maps");
    let maps = std::fs::read_to_string(&maps_path).context(maps_path)?;
    let pagemap_path = format!("/proc/{pid}/pagemap");
    let pagemap = File::open(&pagemap_path).context(pagemap_path)?;
    let mut chunks = Vec::new();
    let mut pages = 0;
    for mapping in maps.lines().filter_map(Mapping::parse) {
        if mapping.dev != (major, minor) || mapping.inode != file.ino() {
            continue;
        }
        let count = (mapping.end - mapping.start) / PAGE;
        let mut entries = vec![0u8; usize::try_from(count * 8)?];
        pagemap.read_exact_at(&mut entries, mapping.start / PAGE * 8)?;
        for (i, entry) in entries.chunks_exact(8).enumerate() {
            let entry = u64::from_ne_bytes(entry.try_into()?);
            if entry & (PRESENT | SWAPPED) != 0 {
                pages += 1;
                chunks.push((mapping.offset + i as u64 * PAGE) / CHUNK);
            }
        }
    }
    chunks.sort_unstable();
    chunks.dedup();
    let ranges = merge(&chunks);
    let bytes = ranges.iter().map(|(_, len)| len).sum();
    let json: Vec<Value> = ranges
        .iter()
        .map(|(offset, len)| json!({"offset": offset, "len": len}))
        .collect();
    write_read_only(into, Value::Array(json).to_string().as_bytes())?;
    Ok(Recorded { pages, bytes })
}

/// The ranges recorded at `path` as kindling-vmm's `prefetch` takes them; `None` where
/// there is no record (or one that cannot be read: the restore then maps lazily).
pub fn load(path: &Path) -> Option<Value> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read a working set");
            return None;
        }
    };
    match serde_json::from_slice::<Value>(&text) {
        Ok(ranges @ Value::Array(_)) => Some(ranges),
        _ => {
            tracing::warn!(path = %path.display(), "a working set that is not a list of ranges");
            None
        }
    }
}

/// Sorted chunk numbers as byte ranges, neighbours merged, at most [`MAX_RANGES`].
fn merge(chunks: &[u64]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &chunk in chunks {
        let full = ranges.len() == MAX_RANGES;
        match ranges.last_mut() {
            Some((offset, len)) if *offset + *len == chunk * CHUNK => *len += CHUNK,
            _ if full => break,
            _ => ranges.push((chunk * CHUNK, CHUNK)),
        }
    }
    ranges
}

/// Writes `path` through a temporary file renamed over it, root's and read-only for all.
fn write_read_only(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
    let written = (|| {
        let mut file = File::create(&temporary)?;
        file.write_all(bytes)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o444))?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written.with_context(|| path.display().to_string())
}

/// One line of `/proc/<pid>/maps`.
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    dev: (u32, u32),
    inode: u64,
}

impl Mapping {
    fn parse(line: &str) -> Option<Mapping> {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let _perms = fields.next()?;
        let offset = fields.next()?;
        let (major, minor) = fields.next()?.split_once(':')?;
        let inode = fields.next()?;
        let hex = |s: &str| u64::from_str_radix(s, 16).ok();
        Some(Mapping {
            start: hex(start)?,
            end: hex(end)?,
            offset: hex(offset)?,
            dev: (
                u32::from_str_radix(major, 16).ok()?,
                u32::from_str_radix(minor, 16).ok()?,
            ),
            inode: inode.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbouring_chunks_merge_into_ranges() {
        assert_eq!(
            merge(&[0, 1, 2, 5, 7, 8]),
            vec![(0, 3 * CHUNK), (5 * CHUNK, CHUNK), (7 * CHUNK, 2 * CHUNK)]
        );
        let scattered: Vec<u64> = (0..3000).map(|i| i * 2).collect();
        assert_eq!(merge(&scattered).len(), MAX_RANGES);
    }

    /// This process maps a file privately and touches three pages in the middle of two
    /// chunks (the kernel maps a few neighbours of each on the way): the record names
    /// exactly those chunks, and nothing of other mappings.
    #[test]
    fn a_record_names_the_chunks_a_process_touched() {
        let dir = tempfile::tempdir().unwrap();
        let memory = dir.path().join("vm.mem");
        let len = usize::try_from(8 * CHUNK).unwrap();
        std::fs::write(&memory, vec![7u8; len]).unwrap();
        let file = File::open(&memory).unwrap();
        // SAFETY: a fresh private read-only mapping of a file this test owns, unmapped
        // below before the file goes.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let bytes = addr.cast::<u8>();
        for offset in [
            CHUNK + CHUNK / 2,
            CHUNK + CHUNK / 2 + PAGE * 100,
            6 * CHUNK + CHUNK / 2,
        ] {
            let offset = usize::try_from(offset).unwrap();
            // SAFETY: within the mapping just made.
            assert_eq!(unsafe { bytes.add(offset).read_volatile() }, 7);
        }
        let into = dir.path().join("vm.prefetch");
        let recorded = record(std::process::id(), &memory, &into).unwrap();
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(addr, len) };
        assert!(recorded.pages >= 3, "{recorded:?}");
        assert_eq!(recorded.bytes, 2 * CHUNK);
        assert_eq!(
            load(&into).unwrap(),
            json!([{"offset": CHUNK, "len": CHUNK}, {"offset": 6 * CHUNK, "len": CHUNK}])
        );
        let mode = std::fs::metadata(&into).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
        assert!(load(&dir.path().join("none")).is_none());
    }
}
