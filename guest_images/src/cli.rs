//! `kindling images ...`: build, list and prune what guests boot.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Subcommand;

use crate::cache::{Cache, EntryInfo};
use crate::initramfs::{self, build_initramfs};
use crate::kernel::{self, build_kernel, KernelKind};
use crate::manifest::{ImagesManifest, RootPaths};
use crate::nested;
use crate::rootfs::{self, build_root_image, Runtime};

/// The `images` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// Build (or find cached) the kernel, its initramfs and root images.
    Build {
        /// Root images to build (repeatable); all of them when none is given.
        #[arg(long = "runtime", value_enum)]
        runtimes: Vec<Runtime>,
        /// Which guest kernel to build.
        #[arg(long, value_enum, default_value_t = KernelKind::Minimal)]
        kernel: KernelKind,
        /// Also the nested-KVM test harness's level-1 host (Debian's generic kernel with
        /// its KVM modules, and busybox), for hosts whose KVM cannot boot Linux.
        #[arg(long)]
        nested_host: bool,
        /// Write the paths of what was built to this JSON file, for `kindling serve
        /// --images` on a host without Debian's build tools.
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
    },
    /// Show what is cached: kind, name (with its content hash), size and path.
    List,
    /// Remove unfinished builds, function code images and entries that current inputs no
    /// longer produce.
    Prune {
        /// Remove everything, including downloaded Debian packages.
        #[arg(long)]
        all: bool,
    },
}

impl ImagesCommand {
    pub fn run(self) -> Result<()> {
        let cache = Cache::open()?;
        match self {
            ImagesCommand::Build {
                runtimes,
                kernel,
                nested_host,
                manifest,
            } => build(&cache, runtimes, kernel, nested_host, manifest.as_deref()),
            ImagesCommand::List => list(&cache),
            ImagesCommand::Prune { all } => print_pruned(&cache, all),
        }
    }
}

fn build(
    cache: &Cache,
    mut runtimes: Vec<Runtime>,
    kind: KernelKind,
    nested_host: bool,
    manifest: Option<&Path>,
) -> Result<()> {
    let started = Instant::now();
    if runtimes.is_empty() {
        runtimes = Runtime::ALL.to_vec();
    }
    let kernel = build_kernel(cache, kind)?;
    report(
        &format!("kernel {}", kind.name()),
        kernel.cached,
        kernel.elapsed,
        &kernel.bzimage.display(),
    );
    if let Some(vmlinux) = &kernel.vmlinux {
        println!("{:>28}  {}", "", vmlinux.display());
    }
    let initramfs = build_initramfs(cache, &kernel)?;
    report(
        "initramfs",
        initramfs.cached,
        initramfs.elapsed,
        &initramfs.path.display(),
    );
    let mut built = ImagesManifest {
        kernel: kernel.bzimage.clone(),
        initramfs: initramfs.path.clone(),
        runtimes: Default::default(),
    };
    for runtime in runtimes {
        let image = build_root_image(cache, runtime)?;
        report(
            &format!("rootfs {}", runtime.name()),
            image.cached,
            image.elapsed,
            &image.ext4.display(),
        );
        built.runtimes.insert(
            runtime.name().to_string(),
            RootPaths {
                ext4: image.ext4,
                dir: image.dir,
            },
        );
    }
    if let Some(path) = manifest {
        built.save(path)?;
    }
    if nested_host {
        let host = nested::build_nested_host(cache)?;
        report(
            "nested host",
            host.cached,
            host.elapsed,
            &host.kernel.display(),
        );
    }
    println!(
        "done in {:.1?}; cache: {}",
        started.elapsed(),
        cache.root().display()
    );
    Ok(())
}

fn report(what: &str, cached: bool, elapsed: Duration, path: &dyn std::fmt::Display) {
    let how = if cached { "cached" } else { "built" };
    println!(
        "{what:<24} {how:<6} {:>8.2}s  {path}",
        elapsed.as_secs_f64()
    );
}

fn list(cache: &Cache) -> Result<()> {
    let entries = cache.list()?;
    if entries.is_empty() {
        println!("nothing cached in {}", cache.root().display());
    }
    for EntryInfo {
        kind,
        name,
        path,
        bytes,
    } in entries
    {
        println!(
            "{kind:<10} {name:<36} {:>9.1} MiB  {}",
            bytes as f64 / f64::from(1 << 20),
            path.display()
        );
    }
    Ok(())
}

fn print_pruned(cache: &Cache, all: bool) -> Result<()> {
    let removed = prune(cache, all)?;
    for path in &removed {
        println!("removed {}", path.display());
    }
    println!("{} entries removed", removed.len());
    Ok(())
}

/// Removes unfinished builds of dead processes, every code image and every entry that the
/// current inputs no longer produce (with `all`: everything); returns what it removed.
pub fn prune(cache: &Cache, all: bool) -> Result<Vec<PathBuf>> {
    let keep = if all {
        BTreeSet::new()
    } else {
        current_entries(cache)
    };
    let removed = cache.prune(|entry| keep.contains(&(entry.kind.clone(), entry.name.clone())))?;
    if all {
        for extra in ["debs", "logs", "stamps", "locks"] {
            crate::cache::remove_tree(&cache.root().join(extra))?;
        }
    }
    Ok(removed)
}

/// `(kind, name)` of every entry that the current inputs produce. An input that cannot be
/// read (no kernel source installed, guest binaries not built) protects nothing, except
/// that an entry whose kind we cannot judge at all is kept.
fn current_entries(cache: &Cache) -> BTreeSet<(String, String)> {
    let mut keep = BTreeSet::new();
    let mut unknown = BTreeSet::new();
    for kind in [KernelKind::Minimal, KernelKind::Stock] {
        let Ok(name) = kernel::entry_name(kind) else {
            unknown.insert(("kernel", kind.name()));
            unknown.insert(("initramfs", kind.name()));
            continue;
        };
        if cache.entry("kernel", &name).is_dir() {
            if let Ok(kernel) = build_kernel(cache, kind) {
                if let Ok(initramfs) = initramfs::current_entry_name(cache, &kernel) {
                    keep.insert(("initramfs".to_string(), initramfs));
                }
            }
        }
        keep.insert(("kernel".to_string(), name));
    }
    for runtime in Runtime::ALL {
        match rootfs::entry_names(cache, runtime) {
            Ok(names) => {
                for (kind, name) in [("rootfs", 0), ("base", 1)]
                    .iter()
                    .filter_map(|(k, i)| names.get(*i).map(|n| (k, n)))
                {
                    keep.insert((kind.to_string(), name.clone()));
                }
            }
            Err(_) => {
                unknown.insert(("rootfs", runtime.name()));
                unknown.insert(("base", runtime.name()));
            }
        }
    }
    match nested::current_entry_name() {
        Ok(name) => {
            keep.insert(("nested".to_string(), name));
        }
        Err(_) => {
            unknown.insert(("nested", nested::ENTRY_PREFIX));
        }
    }
    // Entries of a kind and prefix whose current name we could not compute stay.
    if let Ok(entries) = cache.list() {
        for entry in entries {
            let prefix = entry.name.rsplit_once('-').map_or("", |(p, _)| p);
            if unknown.contains(&(entry.kind.as_str(), prefix)) {
                keep.insert((entry.kind, entry.name));
            }
        }
    }
    keep
}
