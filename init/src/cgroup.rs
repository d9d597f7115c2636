//! The workload's cgroup (v2): the bootstrap and everything it starts live in
//! `/sys/fs/cgroup/<cgroup>`, with the memory and pids limits from the configuration, so
//! that the bootstrap can read the workload's memory use and a runaway function hits its
//! own limits rather than starving init.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};

use crate::config::Config;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Where init moves itself when its own cgroup must give controllers to the workload.
const INIT_LEAF: &str = "init";

/// The workload cgroup, created at boot and removed at shutdown.
#[derive(Debug)]
pub struct Workload {
    dir: PathBuf,
    /// Kept open so that the bootstrap's child can join with one `write` between fork
    /// and exec, where allocating or opening files is not safe.
    procs: Arc<File>,
}

impl Workload {
    /// Creates the cgroup and applies the limits; `None` when `cgroup` is empty.
    pub fn create(config: &Config) -> Result<Option<Self>> {
        if config.cgroup.is_empty() {
            return Ok(None);
        }
        if config.cgroup == INIT_LEAF {
            bail!("cgroup: `{INIT_LEAF}` is reserved for init itself");
        }
        let root = Path::new(CGROUP_ROOT);
        let fs_type = statfs(root)
            .with_context(|| format!("statfs {CGROUP_ROOT}"))?
            .filesystem_type();
        if fs_type != CGROUP2_SUPER_MAGIC {
            bail!("{CGROUP_ROOT} is not a cgroup2 filesystem");
        }
        let limits = [
            (
                "memory",
                "memory.max",
                config.memory_limit.as_ref().and_then(|m| m.bytes()),
            ),
            ("pids", "pids.max", config.pids_limit),
        ];
        let wanted: Vec<&str> = limits
            .iter()
            .filter(|(_, _, value)| value.is_some())
            .map(|(controller, _, _)| *controller)
            .collect();
        enable_controllers(root, &wanted)?;

        let dir = root.join(&config.cgroup);
        match fs::create_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(e).with_context(|| format!("create cgroup {}", dir.display()));
            }
            _ => {}
        }
        for (_, file, value) in limits {
            if let Some(value) = value {
                write(&dir.join(file), &value.to_string())?;
            }
        }
        let procs_path = dir.join("cgroup.procs");
        let procs = File::options()
            .write(true)
            .open(&procs_path)
            .with_context(|| format!("open {}", procs_path.display()))?;
        Ok(Some(Self {
            dir,
            procs: Arc::new(procs),
        }))
    }

    /// A hook for `pre_exec` that moves the calling process into the cgroup before it
    /// runs anything. Async-signal-safe: one `write(2)` to an already open file.
    pub fn join_hook(&self) -> impl Fn() -> io::Result<()> + Send + Sync + 'static {
        let procs = Arc::clone(&self.procs);
        move || (&*procs).write_all(b"0")
    }

    /// Removes the cgroup; every process in it must have exited.
    pub fn remove(self) -> Result<()> {
        fs::remove_dir(&self.dir).with_context(|| format!("remove cgroup {}", self.dir.display()))
    }
}

/// Turns on `controllers` for the children of `root`, with a clear error when the kernel
/// does not offer one of them.
fn enable_controllers(root: &Path, controllers: &[&str]) -> Result<()> {
    if controllers.is_empty() {
        return Ok(());
    }
    let available_path = root.join("cgroup.controllers");
    let available = fs::read_to_string(&available_path)
        .with_context(|| format!("read {}", available_path.display()))?;
    if let Some(missing) = controllers
        .iter()
        .find(|c| !available.split_whitespace().any(|a| a == **c))
    {
        bail!(
            "cgroup controller {missing} is not available (cgroup.controllers: {})",
            available.trim()
        );
    }
    let enable: Vec<String> = controllers.iter().map(|c| format!("+{c}")).collect();
    let enable = enable.join(" ");
    let subtree_control = root.join("cgroup.subtree_control");
    match fs::write(&subtree_control, &enable) {
        // cgroup2's "no internal processes" rule: below the real root (the sandbox's
        // cgroup namespace), a cgroup holding init cannot hand controllers to children.
        // Init moves into a leaf of its own and tries again.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            let leaf = root.join(INIT_LEAF);
            fs::create_dir_all(&leaf)
                .with_context(|| format!("create cgroup {}", leaf.display()))?;
            write(&leaf.join("cgroup.procs"), "0")?;
            write(&subtree_control, &enable)
        }
        result => {
            result.with_context(|| format!("write {enable} to {}", subtree_control.display()))
        }
    }
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).with_context(|| format!("write {value} to {}", path.display()))
}
