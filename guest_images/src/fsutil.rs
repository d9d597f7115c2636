//! Copying plain trees (function code) into images: folders, regular files and symlinks
//! with their permission bits; ownership becomes the builder's (root in CI), which is what
//! a read-only `/var/task` should have.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use walkdir::WalkDir;

/// Copies the contents of `src` into the folder `dst` (created if missing).
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    fs::create_dir_all(dst)?;
    for entry in WalkDir::new(src).min_depth(1).sort_by_file_name() {
        let entry = entry.with_context(|| format!("cannot read {}", src.display()))?;
        let rel = entry
            .path()
            .strip_prefix(src)
            .expect("walk stays below its root");
        let target = dst.join(rel);
        let meta = entry.path().symlink_metadata()?;
        let kind = meta.file_type();
        if kind.is_dir() {
            fs::create_dir_all(&target)?;
            fs::set_permissions(
                &target,
                fs::Permissions::from_mode(meta.permissions().mode() & 0o7777),
            )?;
        } else if kind.is_file() {
            fs::copy(entry.path(), &target)
                .with_context(|| format!("cannot copy {}", entry.path().display()))?;
        } else if kind.is_symlink() {
            symlink(fs::read_link(entry.path())?, &target)?;
        } else {
            bail!(
                "{} is not a file, folder or symlink",
                entry.path().display()
            );
        }
    }
    Ok(())
}
