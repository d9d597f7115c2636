//! Leaving the initramfs for the root disk, the way util-linux's `switch_root` does:
//! mount the disk read-only, move the pseudo filesystems into it, delete the initramfs
//! contents (its memory is otherwise never returned), then make the disk `/`.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
use nix::unistd::{chdir, chroot};

use crate::mounts::{is_mount_point, mount_options, wait_for_device, MOVED_ON_SWITCH};

/// Where the root disk is mounted before it becomes `/`.
const NEW_ROOT: &str = "/newroot";
/// `RAMFS_MAGIC` from linux/magic.h (the initramfs when it is not a tmpfs); libc lacks it.
const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);

/// Switches into the filesystem on `device`. `/` must be an initramfs (ramfs or tmpfs):
/// that is what gets deleted.
pub fn switch_root(device: &Path, fstype: &str, options: &str, wait: Duration) -> Result<()> {
    let root_type = statfs("/").context("statfs /")?.filesystem_type();
    if root_type != RAMFS_MAGIC && root_type != TMPFS_MAGIC {
        bail!(
            "root {} is configured but / is not an initramfs (ramfs or tmpfs), refusing to \
             delete it",
            device.display()
        );
    }
    wait_for_device(device, wait).context("root")?;
    let new_root = Path::new(NEW_ROOT);
    fs::create_dir_all(new_root).context("create /newroot")?;
    let (flags, data) = mount_options(options);
    let data = (!data.is_empty()).then_some(data.as_str());
    mount(Some(device), new_root, Some(fstype), flags, data)
        .with_context(|| format!("mount root {} ({fstype}, {options})", device.display()))?;

    for old in MOVED_ON_SWITCH {
        let old = Path::new(old);
        if !is_mount_point(old)? {
            continue;
        }
        let new = new_root.join(old.strip_prefix("/").expect("absolute"));
        if !new.is_dir() {
            bail!(
                "root {}: {} is missing, the image must have it",
                device.display(),
                old.display()
            );
        }
        mount(
            Some(old),
            &new,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .with_context(|| format!("move {} to {}", old.display(), new.display()))?;
    }

    let root_dev = fs::metadata("/").context("stat /")?.dev();
    remove_tree(Path::new("/"), root_dev, new_root);

    chdir(new_root).context("chdir /newroot")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("move /newroot to /")?;
    chroot(".").context("chroot /newroot")?;
    chdir("/").context("chdir /")?;
    Ok(())
}

/// Deletes everything under `dir` that lives on device `dev`, never descending into
/// another filesystem (a mount point) nor into `keep`. Best effort: an initramfs that
/// cannot be fully freed costs memory, not correctness.
fn remove_tree(dir: &Path, dev: u64, keep: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev || path == keep {
            continue;
        }
        let removed = if meta.is_dir() {
            remove_tree(&path, dev, keep);
            fs::remove_dir(&path)
        } else {
            fs::remove_file(&path)
        };
        if let Err(e) = removed {
            if e.kind() != io::ErrorKind::NotFound {
                crate::console::say!("free initramfs: {}: {e}", path.display());
            }
        }
    }
}
