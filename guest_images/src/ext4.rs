//! ext4 filesystem images made from a folder with `mkfs.ext4 -d` (e2fsprogs ≥ 1.43):
//! no loop device, no mount, no root needed for this step.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use walkdir::WalkDir;

use crate::progress::Step;

const BLOCK: u64 = 4096;
/// Fixed room for the superblock, group descriptors and bitmaps of small images.
const BASE_MARGIN: u64 = 8 << 20;

/// Makes `out`, a read-only-style ext4 image (no journal, no reserved blocks) holding
/// exactly the tree at `src`, sized to its content plus a small margin. The UUID is
/// derived from `key`, so the same inputs give the same filesystem identity.
pub(crate) fn make_ext4(
    src: &Path,
    out: &Path,
    label: &str,
    key: &str,
    step: &Step,
    log: &Path,
) -> Result<()> {
    let (data, inodes) = measure(src)?;
    // 10% slack for directory growth, extent blocks and the inode tables (256 B each).
    let bytes = data + data / 10 + inodes * 256 + BASE_MARGIN;
    let blocks = bytes.div_ceil(BLOCK);
    let inodes = inodes + inodes / 10 + 64;
    let uuid = uuid_from_key(key);
    step.run(
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-m",
                "0",
                "-O",
                "^has_journal",
            ])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-L")
            .arg(&label[..label.len().min(16)])
            .arg("-U")
            .arg(&uuid)
            .arg("-E")
            .arg(format!("hash_seed={uuid}"))
            .arg("-d")
            .arg(src)
            .arg(out)
            .arg(blocks.to_string()),
        log,
    )
    .context("mkfs.ext4 (from e2fsprogs) failed; is e2fsprogs ≥ 1.43 installed?")
}

/// Bytes the tree needs in 4 KiB blocks, and its number of inodes.
fn measure(src: &Path) -> Result<(u64, u64)> {
    let (mut bytes, mut inodes) = (0, 0);
    for entry in WalkDir::new(src) {
        let meta = entry
            .with_context(|| format!("cannot read {}", src.display()))?
            .metadata()?;
        inodes += 1;
        // Directories and symlinks longer than the inode's inline room take one block.
        let len = if meta.is_dir() || meta.is_symlink() {
            BLOCK
        } else {
            meta.len()
        };
        bytes += len.div_ceil(BLOCK) * BLOCK;
    }
    Ok((bytes, inodes))
}

/// A UUID-shaped string from a 16-hex-digit key.
fn uuid_from_key(key: &str) -> String {
    let hex: String = key.chars().chain(key.chars().rev()).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
