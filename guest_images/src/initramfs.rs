//! The initramfs: a gzip'd newc cpio with our init as `/init`, a `/dev/console` node (the
//! kernel opens it for init's stdio before anything is mounted), init's configuration and,
//! for the stock kernel, the modules init loads before it mounts the root disk.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use flate2::write::GzEncoder;
use flate2::Compression;

use crate::archive::CpioArchive;
use crate::cache::Cache;
use crate::guest::guest_bins;
use crate::kernel::Kernel;

/// The archive's file name inside its cache entry.
pub const INITRAMFS_FILE: &str = "initramfs.cpio.gz";

/// A built initramfs in the cache.
#[derive(Debug, Clone)]
pub struct Initramfs {
    /// The gzip'd cpio archive, ready for the boot loader.
    pub path: PathBuf,
    pub cached: bool,
    pub elapsed: Duration,
}

/// Builds (or finds) the initramfs that boots `kernel` into the root disk `/dev/vda`.
pub fn build_initramfs(cache: &Cache, kernel: &Kernel) -> Result<Initramfs> {
    let bins = guest_bins()?;
    let config = init_config(kernel)?;
    let name = entry_name(cache, kernel, &bins.init, &config)?;
    let built = cache.get_or_build("initramfs", &name, |out| {
        let file = File::create(out.join(INITRAMFS_FILE))?;
        let mut archive = CpioArchive::new(GzEncoder::new(file, Compression::best()));
        for dir in ["dev", "proc", "sys", "run", "tmp", "etc", "etc/kindling"] {
            archive.dir(dir)?;
        }
        archive.node("dev/console", 0o020600, (5, 1))?;
        archive.file("init", 0o100755, &fs::read(&bins.init)?)?;
        archive.file("etc/kindling/init.json", 0o100644, config.as_bytes())?;
        for module in &kernel.modules {
            archive.file_in_tree(module, 0o100644, &fs::read(kernel.dir.join(module))?)?;
        }
        archive.finish()?.finish()?.sync_all()?;
        Ok(())
    })?;
    Ok(Initramfs {
        path: built.path.join(INITRAMFS_FILE),
        cached: built.cached,
        elapsed: built.elapsed,
    })
}

/// The cache entry name of the initramfs for `kernel` with the current init.
pub(crate) fn current_entry_name(cache: &Cache, kernel: &Kernel) -> Result<String> {
    entry_name(cache, kernel, &guest_bins()?.init, &init_config(kernel)?)
}

fn entry_name(cache: &Cache, kernel: &Kernel, init: &Path, config: &str) -> Result<String> {
    let kernel_entry = kernel
        .dir
        .file_name()
        .expect("entries have names")
        .to_string_lossy();
    let key = cache
        .fingerprint("initramfs")
        .file("init", init)?
        .str("kernel", &kernel_entry)
        .str("config", config)
        .key();
    Ok(format!("{}-{key}", kernel.kind.name()))
}

/// init's `/etc/kindling/init.json` inside the initramfs: what to load and what to
/// switch_root into (see guest_images/README.md for every key).
fn init_config(kernel: &Kernel) -> Result<String> {
    let modules: Vec<String> = kernel.modules.iter().map(|m| format!("/{m}")).collect();
    let config = serde_json::json!({
        "root": "/dev/vda",
        "root_fstype": "ext4",
        "root_options": "ro",
        "modules": modules,
    });
    Ok(serde_json::to_string_pretty(&config)?)
}
