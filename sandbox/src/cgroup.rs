//! The memory and pids limits of one sandbox, in a cgroup of its own.
//!
//! cgroup v2 is used where a v2 hierarchy owns both the `memory` and `pids` controllers;
//! on hybrid hosts (v1 controllers beside an empty `unified` v2 mount) the v1 `memory`
//! and `pids` hierarchies hold the limits, and the sandbox still gets a cgroup in the v2
//! hierarchy: the guest's init mounts cgroup2 inside the sandbox's cgroup namespace and
//! makes its workload cgroup there, which must land under the sandbox's, not the host's
//! root. That v2 cgroup (the only one on a v2 host) is also where the sandbox is frozen
//! between invocations ([`CgroupFreezer`]). The directory and control-file operations are [`kindling_plumbing::cgroup`]'s,
//! shared with the guest's init and bootstrap; this module picks hierarchies and limits.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use async_trait::async_trait;
use kindling_plumbing::cgroup::{self, Hierarchies};
use kindling_runtime_api::environment::Freezer;

/// The limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u32,
}

/// One sandbox's cgroup: a single v2 directory, or one directory per v1 hierarchy.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates `<parent>/<name>` in the hierarchies holding memory and pids, with `limits`.
    pub fn create(parent: &str, name: &str, limits: Limits) -> Result<Self> {
        let found = Hierarchies::read()?;
        if let Some(root) = found.v2_offering(&["memory", "pids"]) {
            return Self::create_v2(root, parent, name, limits);
        }
        let (Some(memory), Some(pids)) = (found.v1("memory"), found.v1("pids")) else {
            bail!("no cgroup hierarchy with the memory and pids controllers is mounted");
        };
        let mut dirs = vec![memory.join(parent).join(name), pids.join(parent).join(name)];
        dirs.extend(found.v2().map(|root| root.join(parent).join(name)));
        let created = Cgroup { dirs };
        created.make_dirs()?;
        // The combined memory+swap limit (when swap accounting exists) may never be
        // below the memory limit, so it is written second.
        let memory_dir = &created.dirs[0];
        let bytes = limits.memory_bytes.to_string();
        cgroup::write(memory_dir, "memory.limit_in_bytes", &bytes)?;
        if memory_dir.join("memory.memsw.limit_in_bytes").exists() {
            cgroup::write(memory_dir, "memory.memsw.limit_in_bytes", &bytes)?;
        }
        cgroup::write(&created.dirs[1], "pids.max", &limits.pids.to_string())?;
        Ok(created)
    }

    fn create_v2(root: &Path, parent: &str, name: &str, limits: Limits) -> Result<Self> {
        let parent_dir = root.join(parent);
        let created = Cgroup {
            dirs: vec![parent_dir.join(name)],
        };
        cgroup::create_all(&parent_dir)?;
        // A v2 child sees a controller only when every ancestor delegates it.
        for dir in [root, parent_dir.as_path()] {
            cgroup::enable_controllers(dir, &["memory", "pids"])?;
        }
        created.make_dirs()?;
        let dir = &created.dirs[0];
        cgroup::write(dir, "memory.max", &limits.memory_bytes.to_string())?;
        if dir.join("memory.swap.max").exists() {
            cgroup::write(dir, "memory.swap.max", "0")?;
        }
        cgroup::write(dir, "pids.max", &limits.pids.to_string())?;
        Ok(created)
    }

    /// The cgroup's directories (one for v2; memory, pids and any v2 one for v1).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The freezer of the cgroup's v2 directory, which every process of the sandbox
    /// joins; `None` on a host without a cgroup2 hierarchy (v1 only).
    pub fn freezer(&self) -> Option<CgroupFreezer> {
        self.dirs
            .iter()
            .find(|dir| dir.join(FREEZE).is_file())
            .map(|dir| CgroupFreezer { dir: dir.clone() })
    }

    /// The v2 directories (those the guest's init may make its workload cgroup in).
    pub fn v2_dirs(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .filter(|dir| dir.join("cgroup.subtree_control").is_file())
            .cloned()
            .collect()
    }

    /// The most memory the sandbox's processes have used at once since it was created, in
    /// bytes: v2's `memory.peak` (Linux 5.19+) or v1's `memory.max_usage_in_bytes`, both
    /// kept by the kernel; `None` where it keeps neither.
    pub fn memory_peak_bytes(&self) -> Option<u64> {
        // The memory controller's directory comes first, v1 or v2.
        let dir = &self.dirs[0];
        ["memory.peak", "memory.max_usage_in_bytes"]
            .into_iter()
            .find_map(|file| cgroup::read_u64(dir, file).ok())
    }

    /// The `cgroup.procs` files a process writes its PID to in order to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// SIGKILLs every process in the cgroup until it is empty (or `patience` runs out).
    pub async fn kill_all(&self, patience: Duration) -> io::Result<()> {
        let dir = &self.dirs[0];
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            // Past the deadline only a look, to say who is left.
            let expired = tokio::time::Instant::now() >= deadline;
            let found = if expired {
                cgroup::procs(dir)
            } else {
                cgroup::kill_procs(dir)
            };
            let pids = match found {
                Ok(pids) => pids,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            if pids.is_empty() {
                return Ok(());
            }
            if expired {
                let pids: Vec<String> = pids.iter().map(ToString::to_string).collect();
                return Err(io::Error::other(format!(
                    "processes still in {} after SIGKILL: {}",
                    dir.join("cgroup.procs").display(),
                    pids.join(" ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Removes the cgroup's directories, and the cgroups the guest made inside them;
    /// they must be empty of processes.
    pub async fn remove(&self, patience: Duration) -> io::Result<()> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut tree = Vec::new();
        for dir in &self.dirs {
            tree.extend(cgroup::removal_order(dir)?);
        }
        for dir in &tree {
            loop {
                match cgroup::remove(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    // The kernel lets go of a cgroup a moment after its last process died.
                    Err(e)
                        if e.raw_os_error() == Some(nix::libc::EBUSY)
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Removes `<parent>/<name>` from every cgroup hierarchy that has it: what a sandbox
    /// leaves when its server dies without stopping it. Its processes died with the
    /// server; any still there are killed and the cgroup is left for the next start.
    pub fn remove_leftover(parent: &str, name: &str) -> io::Result<()> {
        Hierarchies::read()?.remove_leftover(&Path::new(parent).join(name))?;
        Ok(())
    }

    fn make_dirs(&self) -> Result<()> {
        for dir in &self.dirs {
            cgroup::create_all(dir)?;
        }
        Ok(())
    }
}

/// The cgroup v2 freezer's control file.
const FREEZE: &str = "cgroup.freeze";

/// Freezes a sandbox with cgroup v2's freezer: every process of its cgroup and of the
/// cgroups the guest made inside stops, the sandbox helper included. Unlike v1's freezer,
/// v2 lets SIGKILL through, so a frozen sandbox can still be killed.
#[derive(Debug)]
pub struct CgroupFreezer {
    dir: PathBuf,
}

#[async_trait]
impl Freezer for CgroupFreezer {
    /// Writes `1` to `cgroup.freeze` and does not wait for `frozen 1` in `cgroup.events`:
    /// the kernel stops each task on its own way back to user space, nothing on the host
    /// needs the moment the last one stopped, and a task in uninterruptible sleep would
    /// hold such a wait for as long as it sleeps. A thaw that comes first simply wins.
    async fn freeze(&self) -> io::Result<()> {
        cgroup::write(&self.dir, FREEZE, "1").map_err(Into::into)
    }

    /// Writes `0`: the kernel wakes the tasks at once, so there is nothing to wait for.
    async fn thaw(&self) -> io::Result<()> {
        cgroup::write(&self.dir, FREEZE, "0").map_err(Into::into)
    }
}
