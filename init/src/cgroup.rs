//! The workload's cgroup (v2): the bootstrap and everything it starts live in
//! `/sys/fs/cgroup/<cgroup>`, with the memory and pids limits from the configuration, so
//! that the bootstrap can read the workload's memory use and a runaway function hits its
//! own limits rather than starving init.

use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kindling_plumbing::cgroup::{self, Joiner};
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
    joiner: Joiner,
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
        let mut wanted: Vec<&str> = limits
            .iter()
            .filter(|(_, _, value)| value.is_some())
            .map(|(controller, _, _)| *controller)
            .collect();
        // Memory accounting even without a limit (a microVM's limit is its RAM): the
        // bootstrap reads each runtime's peak and OOM kills from its memory controller.
        if !wanted.contains(&"memory") && cgroup::controllers(root)?.iter().any(|c| c == "memory") {
            wanted.push("memory");
        }
        enable_controllers(root, &wanted)?;

        let dir = root.join(&config.cgroup);
        cgroup::create(&dir)?;
        for (_, file, value) in limits {
            if let Some(value) = value {
                cgroup::write(&dir, file, &value.to_string())?;
            }
        }
        let joiner = Joiner::open(&dir)?;
        Ok(Some(Self { dir, joiner }))
    }

    /// A hook for `pre_exec` that moves the calling process into the cgroup before it
    /// runs anything. Async-signal-safe: one `write(2)` to an already open file.
    pub fn join_hook(&self) -> impl Fn() -> io::Result<()> + Send + Sync + 'static {
        let joiner = self.joiner.clone();
        move || joiner.join()
    }

    /// Removes the cgroup and those the bootstrap made in it; every process in them must
    /// have exited.
    pub fn remove(self) -> Result<()> {
        for dir in cgroup::removal_order(&self.dir)? {
            cgroup::remove(&dir)?;
        }
        Ok(())
    }
}

/// Turns on `controllers` for the children of `root`, with a clear error when the kernel
/// does not offer one of them.
fn enable_controllers(root: &Path, controllers: &[&str]) -> Result<()> {
    if controllers.is_empty() {
        return Ok(());
    }
    let available = cgroup::controllers(root)?;
    if let Some(missing) = controllers
        .iter()
        .find(|c| !available.iter().any(|a| a == *c))
    {
        bail!(
            "cgroup controller {missing} is not available (cgroup.controllers: {})",
            available.join(" ")
        );
    }
    match cgroup::enable_controllers(root, controllers) {
        // cgroup2's "no internal processes" rule: below the real root (the sandbox's
        // cgroup namespace), a cgroup holding init cannot hand controllers to children.
        // Init moves into a leaf of its own and tries again.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            let leaf = root.join(INIT_LEAF);
            cgroup::create(&leaf)?;
            cgroup::write(&leaf, "cgroup.procs", "0")?;
            Ok(cgroup::enable_controllers(root, controllers)?)
        }
        result => Ok(result?),
    }
}
