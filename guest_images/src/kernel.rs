//! The guest kernel: a minimal microVM kernel built from Debian's `linux-source-6.1`
//! (tinyconfig + `kernel/minimal.config`), or Debian's stock cloud kernel whose virtio and
//! vsock drivers are modules that init loads from the initramfs.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cache::{remove_tree, Cache, Fingerprint};
use crate::progress::Step;

/// The config fragment applied on top of `make tinyconfig`; every line is verified.
pub const MINIMAL_FRAGMENT: &str = include_str!("../kernel/minimal.config");
const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
const STOCK_METAPACKAGE: &str = "linux-image-cloud-amd64";
/// Stock-kernel drivers a microVM needs before it can mount its root disk and reach the
/// host; their dependencies come along from `modules.dep`.
const STOCK_MODULES: [&str; 4] = [
    "virtio_mmio",
    "virtio_blk",
    "vmw_vsock_virtio_transport",
    "ext4",
];
const MANIFEST: &str = "kernel.json";

/// Which kernel a guest boots ([`KernelKind::summary`] says what each is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelKind {
    Minimal,
    Stock,
}

impl KernelKind {
    pub const ALL: [KernelKind; 2] = [KernelKind::Minimal, KernelKind::Stock];

    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Minimal => "minimal",
            KernelKind::Stock => "stock",
        }
    }

    /// What the kernel is, in one line (for a CLI's help).
    pub fn summary(self) -> &'static str {
        match self {
            KernelKind::Minimal => {
                "Built here from linux-source-6.1: everything built in, boots in well under a second"
            }
            KernelKind::Stock => {
                "Debian's linux-image-cloud-amd64; drivers are modules (needs ACPI device discovery)"
            }
        }
    }
}

impl std::str::FromStr for KernelKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<KernelKind> {
        KernelKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown kernel {s:?}; known: minimal, stock"))
    }
}

/// A built kernel in the cache.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub kind: KernelKind,
    /// The cache entry holding everything below.
    pub dir: PathBuf,
    /// The compressed, bootable image (`bzImage`).
    pub bzimage: PathBuf,
    /// The uncompressed ELF kernel (PVH entry), for the minimal kernel only.
    pub vmlinux: Option<PathBuf>,
    /// The kernel's `.config`.
    pub config: PathBuf,
    /// `uname -r` of the kernel.
    pub release: String,
    /// Modules to load in this order, relative to `dir` and to the initramfs root
    /// (`lib/modules/<release>/...`); empty for the minimal kernel.
    pub modules: Vec<String>,
    pub cached: bool,
    pub elapsed: Duration,
}

/// What a kernel entry records about itself, so a cache hit needs no probing.
#[derive(Serialize, Deserialize)]
struct Manifest {
    kind: KernelKind,
    release: String,
    vmlinux: bool,
    modules: Vec<String>,
}

/// Builds (or finds in the cache) the kernel of the given kind.
pub fn build_kernel(cache: &Cache, kind: KernelKind) -> Result<Kernel> {
    let name = entry_name(kind)?;
    let built = match kind {
        KernelKind::Minimal => {
            cache.get_or_build("kernel", &name, |out| build_minimal(cache, &name, out))?
        }
        KernelKind::Stock => {
            cache.get_or_build("kernel", &name, |out| fetch_stock(cache, &name, out))?
        }
    };
    let manifest: Manifest = serde_json::from_slice(&fs::read(built.path.join(MANIFEST))?)
        .with_context(|| {
            format!(
                "{} is damaged; run `kindling images prune --all`",
                built.path.display()
            )
        })?;
    let dir = built.path;
    Ok(Kernel {
        kind,
        bzimage: dir.join("bzImage"),
        vmlinux: manifest.vmlinux.then(|| dir.join("vmlinux")),
        config: dir.join("config"),
        release: manifest.release,
        modules: manifest.modules,
        dir,
        cached: built.cached,
        elapsed: built.elapsed,
    })
}

/// The cache entry name of a kernel: what it is built from, hashed.
pub(crate) fn entry_name(kind: KernelKind) -> Result<String> {
    let mut fp = Fingerprint::new("kernel");
    fp.str("kind", kind.name());
    match kind {
        KernelKind::Minimal => {
            fp.str("source", &installed_version(SOURCE_PACKAGE)?)
                .str("fragment", MINIMAL_FRAGMENT);
        }
        KernelKind::Stock => {
            let package = image_package(STOCK_METAPACKAGE)?;
            fp.str("package", &package)
                .str("version", &candidate_version(&package)?);
            for module in STOCK_MODULES {
                fp.str("module", module);
            }
        }
    }
    Ok(format!("{}-{}", kind.name(), fp.key()))
}

fn build_minimal(cache: &Cache, name: &str, out: &Path) -> Result<()> {
    let log = cache.fresh_log(name)?;
    let work = cache.scratch(&format!("{name}-src"))?;
    let result = compile_minimal(cache.step("minimal kernel"), &work, out, &log);
    remove_tree(&work)?;
    result
}

fn compile_minimal(step: Step, work: &Path, out: &Path, log: &Path) -> Result<()> {
    step.say(&format!("unpacking {SOURCE_TARBALL}"));
    step.run(
        Command::new("tar")
            .arg("-xf")
            .arg(SOURCE_TARBALL)
            .arg("-C")
            .arg(work),
        log,
    )?;
    let src = work.join(SOURCE_PACKAGE);
    let fragment = work.join("minimal.config");
    fs::write(&fragment, MINIMAL_FRAGMENT)?;
    let make = || {
        let mut cmd = Command::new("make");
        // Fixed build identity, so the same source and fragment give the same kernel.
        cmd.current_dir(&src)
            .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01")
            .env("KBUILD_BUILD_USER", "kindling")
            .env("KBUILD_BUILD_HOST", "kindling");
        cmd
    };
    step.run(make().arg("tinyconfig"), log)?;
    step.run(
        Command::new("scripts/kconfig/merge_config.sh")
            .current_dir(&src)
            .arg("-m")
            .arg(".config")
            .arg(&fragment),
        log,
    )?;
    step.run(make().arg("olddefconfig"), log)?;
    let config = fs::read_to_string(src.join(".config"))?;
    let lost = missing_options(&config, MINIMAL_FRAGMENT);
    if !lost.is_empty() {
        bail!(
            "make olddefconfig dropped options of guest_images/kernel/minimal.config (a dependency is missing): {}",
            lost.join(", ")
        );
    }
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    step.run(
        make().arg(format!("-j{jobs}")).args(["vmlinux", "bzImage"]),
        log,
    )?;
    let release = String::from_utf8(make().args(["-s", "kernelrelease"]).output()?.stdout)?
        .trim()
        .to_string();
    fs::copy(src.join("arch/x86/boot/bzImage"), out.join("bzImage"))?;
    fs::copy(src.join("vmlinux"), out.join("vmlinux"))?;
    fs::write(out.join("config"), &config)?;
    write_manifest(
        out,
        &Manifest {
            kind: KernelKind::Minimal,
            release: release.clone(),
            vmlinux: true,
            modules: vec![],
        },
    )?;
    step.done(format!("built {release}"));
    Ok(())
}

/// Lines of `fragment` (`CONFIG_X=v` or `# CONFIG_X is not set`) that `config` does not honour.
pub fn missing_options(config: &str, fragment: &str) -> Vec<String> {
    let set: BTreeSet<&str> = config
        .lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .collect();
    fragment
        .lines()
        .map(str::trim)
        .filter(|line| {
            if line.starts_with("CONFIG_") {
                !set.contains(line)
            } else if let Some(off) = line
                .strip_prefix("# ")
                .and_then(|l| l.strip_suffix(" is not set"))
            {
                set.iter().any(|s| s.split('=').next() == Some(off))
            } else {
                false
            }
        })
        .map(str::to_string)
        .collect()
}

fn fetch_stock(cache: &Cache, name: &str, out: &Path) -> Result<()> {
    let log = cache.fresh_log(name)?;
    let work = cache.scratch(&format!("{name}-deb"))?;
    let result = unpack_stock(cache.step("stock kernel"), &work, out, &log);
    remove_tree(&work)?;
    result
}

fn unpack_stock(step: Step, work: &Path, out: &Path, log: &Path) -> Result<()> {
    let package = image_package(STOCK_METAPACKAGE)?;
    let unpacked = unpack_kernel_package(&step, work, &package, &STOCK_MODULES, out, log)?;
    write_manifest(
        out,
        &Manifest {
            kind: KernelKind::Stock,
            release: unpacked.release.clone(),
            vmlinux: false,
            modules: unpacked.modules,
        },
    )?;
    step.done(format!("unpacked {}", unpacked.release));
    Ok(())
}

/// What [`unpack_kernel_package`] copied.
pub(crate) struct UnpackedKernel {
    /// `uname -r` of the kernel.
    pub release: String,
    /// The modules in load order, relative to the entry (`lib/modules/<release>/...`).
    pub modules: Vec<String>,
}

/// Downloads Debian's kernel image `package` (never installs it) and copies into `out` its
/// kernel (`bzImage`), its `config` and the `wanted` modules with their dependencies.
pub(crate) fn unpack_kernel_package(
    step: &Step,
    work: &Path,
    package: &str,
    wanted: &[&str],
    out: &Path,
    log: &Path,
) -> Result<UnpackedKernel> {
    let root = work.join("root");
    apt_unpack(step, work, package, &root, log)?;
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(package)
        .to_string();
    fs::copy(
        root.join(format!("boot/vmlinuz-{release}")),
        out.join("bzImage"),
    )?;
    fs::copy(
        root.join(format!("boot/config-{release}")),
        out.join("config"),
    )?;
    let moddir = format!("lib/modules/{release}");
    // The package leaves modules.dep to its postinst; make it in the unpacked tree.
    step.run(
        Command::new("depmod").arg("-b").arg(&root).arg(&release),
        log,
    )?;
    let modules = module_load_order(&root.join(&moddir), wanted)?
        .into_iter()
        .map(|rel| format!("{moddir}/{rel}"))
        .collect::<Vec<_>>();
    for module in &modules {
        let dest = out.join(module);
        fs::create_dir_all(dest.parent().expect("module paths have folders"))?;
        fs::copy(root.join(module), &dest)?;
    }
    Ok(UnpackedKernel { release, modules })
}

/// `apt-get download`s `package` into `work` and unpacks it into `root` (`dpkg -x`).
pub(crate) fn apt_unpack(
    step: &Step,
    work: &Path,
    package: &str,
    root: &Path,
    log: &Path,
) -> Result<()> {
    let debs = work.join(format!("{package}.debs"));
    fs::create_dir_all(&debs)?;
    step.run(
        Command::new("apt-get")
            .current_dir(&debs)
            .args(["download", package]),
        log,
    )?;
    let deb = fs::read_dir(&debs)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download {package} gave no .deb"))?;
    step.run(Command::new("dpkg").arg("-x").arg(&deb).arg(root), log)
}

/// The modules (paths relative to the modules folder) to load for `wanted`, each after
/// its dependencies; modules built into the kernel are skipped.
fn module_load_order(moddir: &Path, wanted: &[&str]) -> Result<Vec<String>> {
    let deps =
        fs::read_to_string(moddir.join("modules.dep")).context("depmod made no modules.dep")?;
    let builtin = fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let stem = |path: &str| {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    };
    let table: Vec<(String, Vec<String>)> = deps
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| {
            (
                m.to_string(),
                d.split_whitespace().map(str::to_string).collect(),
            )
        })
        .collect();
    let mut order = Vec::new();
    fn visit(path: &str, table: &[(String, Vec<String>)], order: &mut Vec<String>) {
        if order.iter().any(|p| p == path) {
            return;
        }
        if let Some((_, deps)) = table.iter().find(|(m, _)| m == path) {
            for dep in deps {
                visit(dep, table, order);
            }
        }
        order.push(path.to_string());
    }
    for name in wanted {
        match table.iter().find(|(m, _)| stem(m) == *name) {
            Some((path, _)) => visit(path, &table, &mut order),
            None if builtin.lines().any(|l| stem(l) == *name) => {}
            None => bail!("the kernel has no module {name}"),
        }
    }
    Ok(order)
}

fn write_manifest(out: &Path, manifest: &Manifest) -> Result<()> {
    Ok(fs::write(
        out.join(MANIFEST),
        serde_json::to_vec_pretty(manifest)?,
    )?)
}

/// The versioned image package that a metapackage (`linux-image-cloud-amd64`) points at.
pub(crate) fn image_package(metapackage: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", metapackage])
        .output()
        .context("cannot run apt-cache")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
        .with_context(|| format!("apt knows no {metapackage}; run apt-get update"))
}

fn installed_version(package: &str) -> Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .output()?;
    if !out.status.success() || out.stdout.is_empty() || !Path::new(SOURCE_TARBALL).is_file() {
        bail!(
            "{package} is not installed: apt-get install {package} bc bison flex libelf-dev libssl-dev lz4 make gcc"
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

pub(crate) fn candidate_version(package: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", package])
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(str::to_string)
        .with_context(|| format!("apt knows no version of {package}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_and_unwanted_options_are_reported() {
        let fragment = "# c\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\n";
        let config = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n";
        assert_eq!(
            missing_options(config, fragment),
            ["# CONFIG_B is not set", "CONFIG_C=y"]
        );
        assert!(missing_options("CONFIG_A=y\nCONFIG_C=y\n", fragment).is_empty());
    }

    #[test]
    fn modules_come_after_their_dependencies() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko\n\
             kernel/fs/jbd2/jbd2.ko:\nkernel/fs/mbcache.ko:\nkernel/drivers/virtio/virtio-mmio.ko:\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("modules.builtin"),
            "kernel/drivers/block/virtio_blk.ko\n",
        )
        .unwrap();
        let order = module_load_order(dir.path(), &["virtio_mmio", "virtio_blk", "ext4"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio-mmio.ko",
                "kernel/fs/jbd2/jbd2.ko",
                "kernel/fs/mbcache.ko",
                "kernel/fs/ext4/ext4.ko"
            ]
        );
        assert!(module_load_order(dir.path(), &["nosuch"]).is_err());
    }
}
