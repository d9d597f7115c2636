//! The initramfs: a gzip'd newc cpio with our init as `/init`, a `/dev/console` node (the
//! kernel opens it for init's stdio before anything is mounted), init's configuration and,
//! for the stock kernel, the modules init loads before it mounts the root disk.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use flate2::write::GzEncoder;
use flate2::Compression;

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
        let mut archive = Archive {
            out: GzEncoder::new(file, Compression::best()),
            ino: 1,
        };
        for dir in ["dev", "proc", "sys", "run", "tmp", "etc", "etc/kindling"] {
            archive.dir(dir)?;
        }
        archive.node("dev/console", 0o020600, (5, 1))?;
        archive.file("init", 0o100755, &fs::read(&bins.init)?)?;
        archive.file("etc/kindling/init.json", 0o100644, config.as_bytes())?;
        let mut made = std::collections::BTreeSet::new();
        for module in &kernel.modules {
            let mut parent = Path::new(module).parent();
            let mut missing = Vec::new();
            while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
                if made.insert(dir.to_path_buf()) {
                    missing.push(dir.to_path_buf());
                }
                parent = dir.parent();
            }
            for dir in missing.iter().rev() {
                archive.dir(&dir.to_string_lossy())?;
            }
            archive.file(module, 0o100644, &fs::read(kernel.dir.join(module))?)?;
        }
        cpio::newc::trailer(&mut archive.out)?;
        archive.out.finish()?.sync_all()?;
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

/// A newc cpio stream; every entry is owned by root with mtime 0, so equal inputs give
/// equal archives.
struct Archive<W: Write> {
    out: W,
    ino: u32,
}

impl<W: Write> Archive<W> {
    fn header(&mut self, name: &str, mode: u32) -> cpio::newc::Builder {
        self.ino += 1;
        cpio::newc::Builder::new(name)
            .ino(self.ino)
            .mode(mode)
            .uid(0)
            .gid(0)
            .mtime(0)
    }

    fn dir(&mut self, name: &str) -> io::Result<()> {
        self.header(name, 0o040755)
            .nlink(2)
            .write(&mut self.out, 0)
            .finish()?;
        Ok(())
    }

    fn node(&mut self, name: &str, mode: u32, (major, minor): (u32, u32)) -> io::Result<()> {
        self.header(name, mode)
            .rdev_major(major)
            .rdev_minor(minor)
            .write(&mut self.out, 0)
            .finish()?;
        Ok(())
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        let size =
            u32::try_from(data.len()).with_context(|| format!("{name} is too large for cpio"))?;
        let mut writer = self.header(name, mode).nlink(1).write(&mut self.out, size);
        writer.write_all(data)?;
        writer.finish()?;
        Ok(())
    }
}
