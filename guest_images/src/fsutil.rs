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

/// Copies the contents of the folder `src` over the folder `dst`, as a later layer goes
/// over the earlier ones in `/opt`: a file or symlink replaces whatever `dst` has at its
/// path, a folder merges into a folder there (and replaces anything else). Nothing is
/// written through a symlink of `dst`: one in the way of a folder is replaced by it.
/// Folder modes are set last, so a read-only folder of an earlier layer stays writable
/// until every layer is in.
pub(crate) fn overlay_tree(src: &Path, dst: &Path) -> Result<()> {
    let mut modes = Vec::new();
    for entry in WalkDir::new(src).min_depth(1).sort_by_file_name() {
        let entry = entry.with_context(|| format!("cannot read {}", src.display()))?;
        let rel = entry
            .path()
            .strip_prefix(src)
            .expect("walk stays below its root");
        let target = dst.join(rel);
        let meta = entry.path().symlink_metadata()?;
        let existing = target.symlink_metadata().ok().map(|m| m.file_type());
        if meta.is_dir() {
            match existing {
                Some(kind) if kind.is_dir() => {}
                Some(_) => {
                    fs::remove_file(&target)?;
                    fs::create_dir(&target)?;
                }
                None => fs::create_dir(&target)?,
            }
            fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
            modes.push((target, meta.permissions().mode() & 0o7777));
            continue;
        }
        match existing {
            Some(kind) if kind.is_dir() => fs::remove_dir_all(&target)?,
            Some(_) => fs::remove_file(&target)?,
            None => {}
        }
        if meta.is_file() {
            fs::copy(entry.path(), &target)
                .with_context(|| format!("cannot copy {}", entry.path().display()))?;
        } else if meta.file_type().is_symlink() {
            symlink(fs::read_link(entry.path())?, &target)?;
        } else {
            bail!(
                "{} is not a file, folder or symlink",
                entry.path().display()
            );
        }
    }
    for (folder, mode) in modes.into_iter().rev() {
        fs::set_permissions(&folder, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_tree_replaces_and_merges_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, out, outside) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("out"),
            dir.path().join("outside"),
        );
        for d in [&a, &b, &out, &outside] {
            fs::create_dir(d).unwrap();
        }
        fs::create_dir_all(a.join("python/pkg")).unwrap();
        fs::write(a.join("python/pkg/old.py"), "old").unwrap();
        fs::write(a.join("python/pkg/both.py"), "a").unwrap();
        symlink(&outside, a.join("lib")).unwrap();
        fs::write(a.join("bin"), "a file, then a folder").unwrap();
        fs::create_dir_all(b.join("python/pkg")).unwrap();
        fs::write(b.join("python/pkg/both.py"), "b").unwrap();
        fs::create_dir(b.join("lib")).unwrap();
        fs::write(b.join("lib/libx.so"), "x").unwrap();
        fs::create_dir(b.join("bin")).unwrap();
        fs::write(b.join("bin/tool"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(b.join("bin"), fs::Permissions::from_mode(0o555)).unwrap();
        overlay_tree(&a, &out).unwrap();
        overlay_tree(&b, &out).unwrap();
        let read = |p: &str| fs::read_to_string(out.join(p)).unwrap();
        assert_eq!(read("python/pkg/old.py"), "old");
        assert_eq!(read("python/pkg/both.py"), "b");
        assert_eq!(read("lib/libx.so"), "x");
        assert!(!out.join("lib").symlink_metadata().unwrap().is_symlink());
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "written through a link"
        );
        assert_eq!(read("bin/tool"), "#!/bin/sh\n");
        let mode = fs::metadata(out.join("bin")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o555);
    }
}
