//! This project's own guest binaries (`init`, `kindling-bootstrap`), checked to be static:
//! the `provided` image has no libc, so a dynamically linked binary there cannot start.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::locate;

/// ELF program header type of the dynamic loader's path.
const PT_INTERP: u32 = 3;

/// The static guest binaries every image carries.
#[derive(Debug, Clone)]
pub(crate) struct GuestBins {
    pub init: PathBuf,
    pub bootstrap: PathBuf,
}

pub(crate) fn guest_bins() -> Result<GuestBins> {
    let dir = locate::guest_bin_dir().map_err(|e| anyhow!(e))?;
    let bins = GuestBins {
        init: dir.join("init"),
        bootstrap: dir.join("kindling-bootstrap"),
    };
    for bin in [&bins.init, &bins.bootstrap] {
        if !is_static_elf(bin)? {
            bail!(
                "{} is dynamically linked; build it with scripts/build-guest.sh",
                bin.display()
            );
        }
    }
    Ok(bins)
}

/// Whether `path` is a 64-bit little-endian ELF file without a dynamic loader. Reads the
/// ELF header and the program headers only: the guest binaries carry debug information
/// (tens of MiB), and a whole read of each on every image lookup would leave the server's
/// allocator holding as much.
pub fn is_static_elf(path: &Path) -> Result<bool> {
    let file = fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let header = read_at_most(&file, 0, ELF_HEADER)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if header.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        bail!("{} is not a 64-bit little-endian ELF file", path.display());
    }
    let u16_at = |at: usize| {
        header
            .get(at..at + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let phoff = header
        .get(0x20..0x28)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (phoff, u16_at(0x36), u16_at(0x38)) else {
        bail!("{} has a truncated ELF header", path.display());
    };
    // Both counts are 16-bit: the table is at most 4 GiB in theory, a few hundred bytes
    // in practice.
    let table_len = phentsize * phnum;
    if phentsize < 4 || table_len > MAX_PROGRAM_HEADERS {
        bail!(
            "{} has an implausible program header table ({phnum} × {phentsize} bytes)",
            path.display()
        );
    }
    let table = read_at_most(&file, phoff, table_len)
        .with_context(|| format!("cannot read {}", path.display()))?;
    // A table cut short by the end of the file names no loader in what is missing.
    let has_interp = table
        .chunks_exact(phentsize)
        .any(|entry| entry[..4] == PT_INTERP.to_le_bytes());
    Ok(!has_interp)
}

/// The size of an ELF64 header.
const ELF_HEADER: usize = 64;
/// The most program header bytes [`is_static_elf`] reads.
const MAX_PROGRAM_HEADERS: usize = 64 * 1024;

/// Up to `len` bytes of `file` from `offset`: fewer where the file ends first.
fn read_at_most(mut file: &fs::File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(len);
    file.take(u64::try_from(len).unwrap_or(u64::MAX))
        .read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_binaries_are_dynamic_and_text_is_rejected() {
        assert!(!is_static_elf(Path::new("/bin/sh")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("t");
        fs::write(&text, "#!/bin/sh\n").unwrap();
        assert!(is_static_elf(&text).is_err());
    }

    /// An ELF64 header whose program header table follows it, with one entry per type.
    fn elf_with(types: &[u32]) -> Vec<u8> {
        let mut elf = vec![0u8; ELF_HEADER];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&(ELF_HEADER as u64).to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&u16::try_from(types.len()).unwrap().to_le_bytes());
        for kind in types {
            let mut entry = vec![0u8; 56];
            entry[..4].copy_from_slice(&kind.to_le_bytes());
            elf.extend(entry);
        }
        elf
    }

    #[test]
    fn only_the_program_headers_decide() {
        let dir = tempfile::tempdir().unwrap();
        let check = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            fs::write(&path, bytes).unwrap();
            is_static_elf(&path)
        };
        const PT_LOAD: u32 = 1;
        assert!(check("static", &elf_with(&[PT_LOAD, PT_LOAD])).unwrap());
        assert!(!check("dynamic", &elf_with(&[PT_LOAD, PT_INTERP])).unwrap());
        // Megabytes after the table (a binary's code and debug information) change nothing.
        let mut big = elf_with(&[PT_LOAD, PT_INTERP]);
        big.resize(8 << 20, 0xff);
        assert!(!check("big", &big).unwrap());
        // A table cut short by the end of the file: only whole entries count.
        let cut = elf_with(&[PT_LOAD, PT_INTERP]);
        assert!(check("cut", &cut[..cut.len() - 60]).unwrap());
        assert!(check("header", &elf_with(&[PT_LOAD])[..40]).is_err());
        let mut huge = elf_with(&[]);
        huge[0x36..0x38].copy_from_slice(&u16::MAX.to_le_bytes());
        huge[0x38..0x3a].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(check("huge", &huge).is_err());
    }
}
