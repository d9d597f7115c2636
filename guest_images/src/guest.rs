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

/// Whether `path` is a 64-bit little-endian ELF file without a dynamic loader.
pub fn is_static_elf(path: &Path) -> Result<bool> {
    let elf = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| usize::try_from(u64::from_le_bytes(b.try_into().expect("8 bytes"))).ok())
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        bail!("{} is not a 64-bit little-endian ELF file", path.display());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("{} has a truncated ELF header", path.display());
    };
    let has_interp = (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            == Some(PT_INTERP)
    });
    Ok(!has_interp)
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
}
