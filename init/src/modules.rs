//! Kernel modules an image lists, so that a stock distribution kernel whose virtio and
//! vsock drivers are modules can boot.
//!
//! An entry is a path (absolute, or relative to `/lib/modules/<release>/`) or a bare
//! module name looked up in that folder's `modules.dep`. Dependencies are not resolved:
//! the image lists modules in load order.

use std::ffi::CString;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

/// `MODULE_INIT_COMPRESSED_FILE`: the kernel decompresses `.ko.xz`/`.ko.zst`/`.ko.gz`
/// itself (Linux 6.4+ with `CONFIG_MODULE_DECOMPRESS`). Not in nix's flags.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// Loads `modules` in order; one already loaded (built in or loaded earlier) is fine.
pub fn load_all(modules: &[String]) -> Result<()> {
    if modules.is_empty() {
        return Ok(());
    }
    let release = nix::sys::utsname::uname()
        .context("uname")?
        .release()
        .to_string_lossy()
        .into_owned();
    let dir = Path::new("/lib/modules").join(release);
    for module in modules {
        let path = resolve(&dir, module)?;
        load(&path).with_context(|| format!("load module {module} ({})", path.display()))?;
    }
    Ok(())
}

fn load(path: &Path) -> Result<()> {
    let file = File::open(path)?;
    let compressed = [".xz", ".zst", ".gz"]
        .iter()
        .any(|ext| path.to_string_lossy().ends_with(ext));
    let flags = if compressed {
        ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    } else {
        ModuleInitFlags::empty()
    };
    match finit_module(&file, &CString::default(), flags) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The file of one `modules` entry.
fn resolve(dir: &Path, module: &str) -> Result<PathBuf> {
    if module.contains('/') {
        return Ok(dir.join(module));
    }
    let dep_file = dir.join("modules.dep");
    let deps = fs::read_to_string(&dep_file)
        .with_context(|| format!("module {module}: read {}", dep_file.display()))?;
    match find_in_modules_dep(&deps, module) {
        Some(relative) => Ok(dir.join(relative)),
        None => bail!("module {module}: not in {}", dep_file.display()),
    }
}

/// The path of `name` in a `modules.dep` text (`path: dependencies` lines), where `-`
/// and `_` in module names are the same, as modprobe treats them.
fn find_in_modules_dep<'a>(deps: &'a str, name: &str) -> Option<&'a str> {
    let normal = |s: &str| s.replace('-', "_");
    let wanted = normal(name);
    deps.lines()
        .filter_map(|line| line.split_once(':').map(|(path, _)| path))
        .find(|path| {
            let file = path.rsplit('/').next().unwrap_or(path);
            let stem = file.split(".ko").next().unwrap_or(file);
            normal(stem) == wanted
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPS: &str = "kernel/drivers/virtio/virtio_mmio.ko.xz: kernel/drivers/virtio/virtio.ko.xz\n\
                        kernel/net/vmw_vsock/vsock.ko:\n\
                        kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vsock.ko\n";

    #[test]
    fn names_are_found_in_modules_dep() {
        assert_eq!(
            find_in_modules_dep(DEPS, "virtio-mmio"),
            Some("kernel/drivers/virtio/virtio_mmio.ko.xz")
        );
        assert_eq!(
            find_in_modules_dep(DEPS, "vsock"),
            Some("kernel/net/vmw_vsock/vsock.ko")
        );
        assert_eq!(find_in_modules_dep(DEPS, "virtio"), None);
    }

    #[test]
    fn paths_are_relative_to_the_release_folder_and_missing_dep_file_is_named() {
        let dir = Path::new("/nonexistent/6.1.0");
        assert_eq!(resolve(dir, "extra/x.ko").unwrap(), dir.join("extra/x.ko"));
        let e = format!("{:#}", resolve(dir, "x").unwrap_err());
        assert!(e.contains("/nonexistent/6.1.0/modules.dep"), "{e}");
    }
}
