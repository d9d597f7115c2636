//! Pruning the cache: what the current inputs still produce stays, the rest goes.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Result;

use crate::cache::{remove_tree, Cache};
use crate::initramfs;
use crate::kernel::{self, build_kernel, KernelKind};
use crate::nested;
use crate::rootfs::{self, Runtime};

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
            remove_tree(&cache.root().join(extra))?;
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
    for kind in KernelKind::ALL {
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
