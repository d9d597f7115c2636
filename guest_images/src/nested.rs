//! The level-1 host of the nested-KVM test harness: Debian's stock amd64 kernel with its KVM
//! modules (`kvm_amd` and what it needs), `tun` (the taps of network tests), nftables'
//! (`kindling serve`'s filter and NAT for guests), `veth` (the network tests' own
//! internet) and a static busybox. Booted under QEMU TCG with an
//! emulated AMD CPU that has SVM, it gives hosts whose own KVM cannot boot Linux (nested
//! `kvm_pvm`, ENVIRONMENT.md) a real `/dev/kvm` to run kindling-vmm on. Both packages are
//! downloaded and unpacked, never installed.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::cache::{remove_tree, Cache, Fingerprint};
use crate::kernel::{apt_unpack, candidate_version, image_package, unpack_kernel_package};
use crate::progress::Step;

/// Debian's generic kernel: unlike the cloud kernel, it ships `kvm_amd`.
const METAPACKAGE: &str = "linux-image-amd64";
const BUSYBOX_PACKAGE: &str = "busybox-static";
/// The modules L1 loads, in order: KVM; tun for the taps of kindling-vmm's network
/// devices; what the server's nftables table (network/src/nft.rs) uses: tables, the NAT
/// chain and masquerade, conntrack state, fib and reject for `inet`, and the CRC32C that
/// `libcrc32c` (which nf_tables needs) asks the crypto API for when it loads (a soft
/// dependency, which modules.dep does not list); veth for the tests' internet.
const L1_MODULES: [&str; 11] = [
    "kvm_amd",
    "tun",
    "crc32c_generic",
    "nf_tables",
    "nft_chain_nat",
    "nft_masq",
    "nft_ct",
    "nft_fib_inet",
    "nft_reject_inet",
    "veth",
    "nf_conntrack",
];
const MANIFEST: &str = "nested.json";
/// Entry names are `l1-<key>`.
pub(crate) const ENTRY_PREFIX: &str = "l1";

/// A level-1 host in the cache.
#[derive(Debug, Clone)]
pub struct NestedHost {
    /// The cache entry holding everything below.
    pub dir: PathBuf,
    /// The kernel QEMU boots (`bzImage`).
    pub kernel: PathBuf,
    /// A static busybox: the level-1 userland.
    pub busybox: PathBuf,
    /// `uname -r` of the kernel.
    pub release: String,
    /// The modules in load order, relative to `dir` (`lib/modules/<release>/...`).
    pub modules: Vec<String>,
    pub cached: bool,
    pub elapsed: Duration,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    release: String,
    modules: Vec<String>,
}

/// Builds (or finds in the cache) the level-1 host of the current Debian packages.
pub fn build_nested_host(cache: &Cache) -> Result<NestedHost> {
    let package = image_package(METAPACKAGE)?;
    let name = entry_name(&package)?;
    let built = cache.get_or_build("nested", &name, |out| {
        let log = cache.fresh_log(&name)?;
        let work = cache.scratch(&format!("{name}-deb"))?;
        let result = unpack(cache.step("nested-KVM host"), &work, &package, out, &log);
        remove_tree(&work)?;
        result
    })?;
    let dir = built.path;
    let manifest: Manifest =
        serde_json::from_slice(&fs::read(dir.join(MANIFEST))?).with_context(|| {
            format!(
                "{} is damaged; run `kindling images prune --all`",
                dir.display()
            )
        })?;
    Ok(NestedHost {
        kernel: dir.join("bzImage"),
        busybox: dir.join("busybox"),
        release: manifest.release,
        modules: manifest.modules,
        dir,
        cached: built.cached,
        elapsed: built.elapsed,
    })
}

/// The cache entry name (`l1-<key>`) of the host built from kernel image `package`.
pub(crate) fn entry_name(package: &str) -> Result<String> {
    let mut fp = Fingerprint::new("nested");
    fp.str("package", package)
        .str("version", &candidate_version(package)?)
        .str("busybox", &candidate_version(BUSYBOX_PACKAGE)?);
    for module in L1_MODULES {
        fp.str("module", module);
    }
    Ok(format!("{ENTRY_PREFIX}-{}", fp.key()))
}

/// The current entry name, for `kindling images prune`.
pub(crate) fn current_entry_name() -> Result<String> {
    entry_name(&image_package(METAPACKAGE)?)
}

fn unpack(step: Step, work: &Path, package: &str, out: &Path, log: &Path) -> Result<()> {
    let kernel = unpack_kernel_package(&step, work, package, &L1_MODULES, out, log)?;
    let busybox = work.join("busybox");
    apt_unpack(&step, work, BUSYBOX_PACKAGE, &busybox, log)?;
    fs::copy(busybox.join("bin/busybox"), out.join("busybox"))?;
    fs::write(
        out.join(MANIFEST),
        serde_json::to_vec_pretty(&Manifest {
            release: kernel.release.clone(),
            modules: kernel.modules,
        })?,
    )?;
    step.done(format!("unpacked {} and busybox", kernel.release));
    Ok(())
}
