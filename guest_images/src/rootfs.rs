//! Root images, one per runtime, shared read-only by every function of that runtime.
//!
//! An image is our init and bootstrap, the runtime's shims in `/var/runtime`, empty mount
//! points and `/etc/kindling/{image,init}.json`, on top of either nothing (`provided`) or a
//! Debian minbase root made by debootstrap (cached separately as a `base` entry, so a
//! change to init or the shims rebuilds the image in seconds, not the Debian root).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cache::{remove_tree, Cache, Fingerprint};
use crate::ext4::make_ext4;
use crate::guest::guest_bins;
use crate::node;
use crate::progress::Step;
use crate::shims::{self, write_shims, ShimFile, COMPILED_SHIMS_DIR};

/// Where the image's folder and ext4 file sit inside its cache entry.
pub const ROOTFS_DIR: &str = "rootfs";
pub const ROOTFS_EXT4: &str = "rootfs.ext4";
/// Bumped whenever [`Plan::populate`] changes what it adds, so images are rebuilt.
const POPULATE_RECIPE: &str = "5";
/// Where `/etc/resolv.conf` leads: init writes it when the environment has a network.
const RESOLV_CONF_TARGET: &str = "/run/resolv.conf";
/// `/etc/hosts`: `sandbox.localdomain` is where Lambda's extensions listen for telemetry.
const HOSTS: &str =
    "127.0.0.1\tlocalhost sandbox.localdomain sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n";
/// Default Debian mirror; `KINDLING_DEBIAN_MIRROR` overrides it.
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Folders of a Debian root that a read-only function image never reads.
const SLIM: [&str; 7] = [
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/log",
];

/// The runtimes Kindling ships root images for ([`Runtime::summary`] says what each holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    Provided,
    ProvidedDebian,
    Python,
    Node,
}

impl Runtime {
    pub const ALL: [Runtime; 4] = [
        Runtime::Provided,
        Runtime::ProvidedDebian,
        Runtime::Python,
        Runtime::Node,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Runtime::Provided => "provided",
            Runtime::ProvidedDebian => "provided-debian",
            Runtime::Python => "python",
            Runtime::Node => "node",
        }
    }

    /// What the image holds, in one line (for a CLI's help).
    pub fn summary(self) -> &'static str {
        match self {
            Runtime::Provided => {
                "init and bootstrap only; the function brings a static `bootstrap`"
            }
            Runtime::ProvidedDebian => {
                "Debian minimal root with bash, curl and ca-certificates, for shell custom runtimes"
            }
            Runtime::Python => "Debian's python3 plus Kindling's Python runtime",
            Runtime::Node => "Node.js 22 (the official build) plus Kindling's Node runtime",
        }
    }

    /// Debian packages on top of minbase, or `None` for an image without Debian.
    fn debian_packages(self) -> Option<&'static [&'static str]> {
        match self {
            Runtime::Provided => None,
            Runtime::ProvidedDebian => Some(&["bash", "curl", "ca-certificates"]),
            // python3 (not python3-minimal) brings libpython3.11-stdlib, which has json.
            Runtime::Python => Some(&["python3", "ca-certificates"]),
            // Node.js itself is the official build ([`crate::node`]), which needs only
            // the C and C++ libraries.
            Runtime::Node => Some(&["libstdc++6", "ca-certificates"]),
        }
    }

    /// Whether the function brings its own executable `bootstrap`.
    pub(crate) fn custom(self) -> bool {
        matches!(self, Runtime::Provided | Runtime::ProvidedDebian)
    }
}

impl std::str::FromStr for Runtime {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Runtime> {
        Runtime::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                anyhow!("unknown runtime {s:?}; known: provided, provided-debian, python, node")
            })
    }
}

/// A built root image.
#[derive(Debug, Clone)]
pub struct RootImage {
    pub runtime: Runtime,
    /// The root as a folder (for the sandbox).
    pub dir: PathBuf,
    /// The root as an ext4 filesystem (the microVM's read-only `/dev/vda`).
    pub ext4: PathBuf,
    pub cached: bool,
    pub elapsed: Duration,
}

/// `/etc/kindling/image.json`: what the image is and what it was built from.
#[derive(Debug, Serialize, Deserialize)]
pub struct ImageInfo {
    pub runtime: Runtime,
    pub key: String,
    pub debian: Option<DebianInfo>,
    pub init_sha256: String,
    pub bootstrap_sha256: String,
    pub bootstrap: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DebianInfo {
    pub suite: String,
    pub mirror: String,
    pub packages: Vec<String>,
}

/// Builds (or finds) the root image of `runtime`.
pub fn build_root_image(cache: &Cache, runtime: Runtime) -> Result<RootImage> {
    let plan = Plan::new(cache, runtime)?;
    let base = match &plan.debian {
        Some(debian) => Some(build_base(cache, &plan.base_name, debian)?),
        None => None,
    };
    let built = cache.get_or_build("rootfs", &plan.name, |out| {
        let log = cache.fresh_log(&plan.name)?;
        let step = cache.step(format!("root image {}", runtime.name()));
        let root = out.join(ROOTFS_DIR);
        match &base {
            Some(base) => {
                fs::create_dir(&root)?;
                step.run(
                    Command::new("cp").arg("-a").arg(base.join(".")).arg(&root),
                    &log,
                )?;
            }
            None => fs::create_dir(&root)?,
        }
        if runtime == Runtime::Node {
            node::install(cache, &root, &step, &log)?;
        }
        plan.populate(cache, &root)?;
        if runtime == Runtime::Python {
            compile_python_shims(&root, &step, &log)?;
        }
        step.say("mkfs.ext4");
        make_ext4(
            &root,
            &out.join(ROOTFS_EXT4),
            &format!("kindling-{}", runtime.name()),
            &plan.key,
            &step,
            &log,
        )?;
        step.done("built");
        Ok(())
    })?;
    Ok(RootImage {
        runtime,
        dir: built.path.join(ROOTFS_DIR),
        ext4: built.path.join(ROOTFS_EXT4),
        cached: built.cached,
        elapsed: built.elapsed,
    })
}

/// The cache entry names of `runtime`'s image and Debian base (for prune).
pub(crate) fn entry_names(cache: &Cache, runtime: Runtime) -> Result<Vec<String>> {
    let plan = Plan::new(cache, runtime)?;
    Ok([Some(plan.name), plan.debian.map(|_| plan.base_name)]
        .into_iter()
        .flatten()
        .collect())
}

/// Everything one image is made from, and the keys derived from it.
struct Plan {
    runtime: Runtime,
    name: String,
    key: String,
    base_name: String,
    debian: Option<DebianInfo>,
    init: PathBuf,
    bootstrap: PathBuf,
    shims: &'static [ShimFile],
}

impl Plan {
    fn new(cache: &Cache, runtime: Runtime) -> Result<Plan> {
        let bins = guest_bins()?;
        let shims = runtime.shims();
        let debian = runtime.debian_packages().map(|packages| DebianInfo {
            suite: std::env::var("KINDLING_DEBIAN_SUITE").unwrap_or_else(|_| host_suite()),
            mirror: std::env::var("KINDLING_DEBIAN_MIRROR")
                .unwrap_or_else(|_| DEFAULT_MIRROR.to_string()),
            packages: packages.iter().map(|p| p.to_string()).collect(),
        });
        let mut base = Fingerprint::new("base");
        if let Some(debian) = &debian {
            base.str("suite", &debian.suite)
                .str("mirror", &debian.mirror);
            for package in &debian.packages {
                base.str("package", package);
            }
        }
        let base_name = format!("{}-{}", runtime.name(), base.key());
        let mut image = cache.fingerprint("rootfs");
        image
            .str("recipe", POPULATE_RECIPE)
            .str("hosts", HOSTS)
            .str("runtime", runtime.name())
            .str("base", &base_name);
        image
            .file("init", &bins.init)?
            .file("bootstrap", &bins.bootstrap)?;
        if !shims.is_empty() {
            shims::fingerprint(&mut image, "shims", shims);
        }
        if runtime == Runtime::Node {
            node::fingerprint(&mut image);
        }
        let key = image.key();
        Ok(Plan {
            runtime,
            name: format!("{}-{key}", runtime.name()),
            key,
            base_name,
            debian,
            init: bins.init,
            bootstrap: bins.bootstrap,
            shims,
        })
    }

    /// Adds Kindling's parts to a root folder.
    fn populate(&self, cache: &Cache, root: &Path) -> Result<()> {
        for (dir, mode) in [
            ("etc", 0o755),
            ("var", 0o755),
            ("dev", 0o755),
            ("proc", 0o555),
            ("sys", 0o555),
            ("run", 0o755),
            ("tmp", 0o1777),
            ("opt", 0o755),
            ("var/task", 0o755),
            ("var/runtime", 0o755),
            ("sbin", 0o755),
            ("etc/kindling", 0o755),
        ] {
            let path = root.join(dir);
            fs::create_dir_all(&path)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        }
        write_shims(self.shims, &root.join("var/runtime"))?;
        install(&self.init, &root.join("sbin/init"))?;
        install(
            &self.bootstrap,
            &root.join("var/runtime/kindling-bootstrap"),
        )?;
        let info = ImageInfo {
            runtime: self.runtime,
            key: self.key.clone(),
            debian: self.debian.clone(),
            init_sha256: cache.file_digest(&self.init)?,
            bootstrap_sha256: cache.file_digest(&self.bootstrap)?,
            bootstrap: "/var/runtime/kindling-bootstrap".to_string(),
        };
        fs::write(
            root.join("etc/kindling/image.json"),
            serde_json::to_vec_pretty(&info)?,
        )?;
        fs::write(
            root.join("etc/kindling/init.json"),
            serde_json::to_vec_pretty(&root_init_config())?,
        )?;
        // A guest resolves `localhost` from files alone; the build host's DNS settings,
        // which debootstrap copies in, mean nothing inside it: init writes the
        // environment's resolvers into the writable /run, where this link leads.
        fs::write(root.join("etc/hosts"), HOSTS)?;
        let resolv_conf = root.join("etc/resolv.conf");
        if resolv_conf.symlink_metadata().is_ok() {
            fs::remove_file(&resolv_conf)?;
        }
        std::os::unix::fs::symlink(RESOLV_CONF_TARGET, &resolv_conf)?;
        Ok(())
    }
}

/// init's configuration inside the root image (init/README.md has every key): the
/// function code's drive, when attached, is mounted read-only at `/var/task`, and its
/// layers' drive, when attached, at `/opt`. Nothing else is set here, because this file
/// overrides the kernel command line, where a launcher sets per-function keys.
fn root_init_config() -> serde_json::Value {
    serde_json::json!({
        "task": "/dev/vdb",
        "mounts": [{
            "source": "/dev/vdc",
            "target": "/opt",
            "fstype": "ext4",
            "options": "ro,nodev,nosuid",
            "optional": true,
        }],
    })
}

/// Copies a binary into the image as root-owned, mode 0755 (replacing whatever was there,
/// e.g. a Debian `/sbin/init` symlink).
fn install(src: &Path, dest: &Path) -> Result<()> {
    if dest.symlink_metadata().is_ok() {
        fs::remove_file(dest)?;
    }
    fs::copy(src, dest).with_context(|| format!("cannot copy {} into the image", src.display()))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Compiles the shims in `/var/runtime` with the image's own python (a `.pyc` is only
/// good for the interpreter that wrote it) into [`COMPILED_SHIMS_DIR`], sparing every cold
/// start the compilation of the runtime (~3 ms).
fn compile_python_shims(root: &Path, step: &Step, log: &Path) -> Result<()> {
    step.say("compiling the runtime");
    step.run(
        Command::new("chroot")
            .arg(root)
            .args(["/usr/bin/python3", "-m", "compileall", "-q"])
            .args(["--invalidation-mode", "checked-hash", "/var/runtime"])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        log,
    )
    .context("compiling the python runtime in the image (chroot needs root)")?;
    let compiled = root.join(COMPILED_SHIMS_DIR);
    if !compiled.is_dir() {
        bail!("python wrote no {}", compiled.display());
    }
    Ok(())
}

/// The Debian root of a runtime, made by `debootstrap --variant=minbase`.
fn build_base(cache: &Cache, name: &str, debian: &DebianInfo) -> Result<PathBuf> {
    let built = cache.get_or_build("base", name, |out| {
        let log = cache.fresh_log(name)?;
        let step = cache.step(format!(
            "Debian {} root with {}",
            debian.suite,
            debian.packages.join(", ")
        ));
        let debs = cache.root().join("debs");
        fs::create_dir_all(&debs)?;
        let root = out.join(ROOTFS_DIR);
        let result = step.run(
            Command::new("debootstrap")
                .arg("--variant=minbase")
                .arg(format!("--include={}", debian.packages.join(",")))
                .arg(format!("--cache-dir={}", debs.display()))
                .arg(&debian.suite)
                .arg(&root)
                .arg(&debian.mirror),
            &log,
        );
        result.context(
            "debootstrap failed (it needs root, the debootstrap package and the network)",
        )?;
        for dir in SLIM {
            let path = root.join(dir);
            remove_tree(&path)?;
            fs::create_dir_all(&path)?;
        }
        step.done(format!("{} MiB", crate::cache::tree_bytes(&root) >> 20));
        Ok(())
    })?;
    Ok(built.path.join(ROOTFS_DIR))
}

/// The Debian release this machine runs (`VERSION_CODENAME`), else bookworm.
fn host_suite() -> String {
    fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "bookworm".to_string())
}
