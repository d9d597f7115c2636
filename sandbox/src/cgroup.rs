//! The memory and pids limits of one sandbox, in a cgroup of its own.
//!
//! cgroup v2 is used where a v2 hierarchy owns both the `memory` and `pids` controllers;
//! on hybrid hosts (v1 controllers beside an empty `unified` v2 mount) the v1 `memory`
//! and `pids` hierarchies hold the limits, and the sandbox still gets a cgroup in the v2
//! hierarchy: the guest's init mounts cgroup2 inside the sandbox's cgroup namespace and
//! makes its workload cgroup there, which must land under the sandbox's, not the host's
//! root. Only a handful of files are written, so this stays a few plain file writes
//! rather than a general cgroup library.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

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
        let mounts =
            fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
        if let Some(root) = v2_root(&mounts) {
            return Self::create_v2(&root, parent, name, limits);
        }
        let (Some(memory), Some(pids)) = (v1_root(&mounts, "memory"), v1_root(&mounts, "pids"))
        else {
            bail!("no cgroup hierarchy with the memory and pids controllers is mounted");
        };
        let mut dirs = vec![memory.join(parent).join(name), pids.join(parent).join(name)];
        dirs.extend(mount_points(&mounts, "cgroup2").map(|(root, _)| root.join(parent).join(name)));
        let cgroup = Cgroup { dirs };
        cgroup.make_dirs()?;
        // The combined memory+swap limit (when swap accounting exists) may never be
        // below the memory limit, so it is written second.
        let memory_dir = &cgroup.dirs[0];
        let bytes = limits.memory_bytes.to_string();
        cgroup.write(memory_dir, "memory.limit_in_bytes", &bytes)?;
        if memory_dir.join("memory.memsw.limit_in_bytes").exists() {
            cgroup.write(memory_dir, "memory.memsw.limit_in_bytes", &bytes)?;
        }
        cgroup.write(&cgroup.dirs[1], "pids.max", &limits.pids.to_string())?;
        Ok(cgroup)
    }

    fn create_v2(root: &Path, parent: &str, name: &str, limits: Limits) -> Result<Self> {
        let parent_dir = root.join(parent);
        let cgroup = Cgroup {
            dirs: vec![parent_dir.join(name)],
        };
        fs::create_dir_all(&parent_dir)
            .with_context(|| format!("creating {}", parent_dir.display()))?;
        // A v2 child sees a controller only when every ancestor delegates it.
        for dir in [root, parent_dir.as_path()] {
            cgroup.write(dir, "cgroup.subtree_control", "+memory +pids")?;
        }
        cgroup.make_dirs()?;
        let dir = &cgroup.dirs[0];
        cgroup.write(dir, "memory.max", &limits.memory_bytes.to_string())?;
        if dir.join("memory.swap.max").exists() {
            cgroup.write(dir, "memory.swap.max", "0")?;
        }
        cgroup.write(dir, "pids.max", &limits.pids.to_string())?;
        Ok(cgroup)
    }

    /// The cgroup's directories (one for v2; memory, pids and any v2 one for v1).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The `cgroup.procs` files a process writes its PID to in order to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// SIGKILLs every process in the cgroup until it is empty (or `patience` runs out).
    pub async fn kill_all(&self, patience: Duration) -> io::Result<()> {
        let procs = self.dirs[0].join("cgroup.procs");
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let pids = match fs::read_to_string(&procs) {
                Ok(text) => text,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            if pids.trim().is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "processes still in {} after SIGKILL: {}",
                    procs.display(),
                    pids.split_whitespace().collect::<Vec<_>>().join(" ")
                )));
            }
            for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                // A process may have gone between the read and the kill.
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
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
            children_first(dir, &mut tree)?;
        }
        for dir in &tree {
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    // The kernel lets go of a cgroup a moment after its last process died.
                    Err(e)
                        if e.raw_os_error() == Some(nix::libc::EBUSY)
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("removing {}: {e}", dir.display()),
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes `<parent>/<name>` from every cgroup hierarchy that has it: what a sandbox
    /// leaves when its server dies without stopping it. Its processes died with the
    /// server; any still there are killed and the cgroup is left for the next start.
    pub fn remove_leftover(parent: &str, name: &str) -> io::Result<()> {
        let mounts = fs::read_to_string("/proc/self/mounts")?;
        let roots = mount_points(&mounts, "cgroup2").chain(mount_points(&mounts, "cgroup"));
        for (root, _) in roots {
            let dir = root.join(parent).join(name);
            if !dir.is_dir() {
                continue;
            }
            let procs = fs::read_to_string(dir.join("cgroup.procs"))?;
            if !procs.trim().is_empty() {
                for pid in procs.split_whitespace().filter_map(|p| p.parse().ok()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                return Err(io::Error::other(format!(
                    "{} still had processes; killed, removed at the next start",
                    dir.display()
                )));
            }
            let mut tree = Vec::new();
            children_first(&dir, &mut tree)?;
            for dir in &tree {
                fs::remove_dir(dir).map_err(|e| {
                    io::Error::new(e.kind(), format!("removing {}: {e}", dir.display()))
                })?;
            }
        }
        Ok(())
    }

    fn make_dirs(&self) -> Result<()> {
        for dir in &self.dirs {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(())
    }

    fn write(&self, dir: &Path, file: &str, value: &str) -> Result<()> {
        let path = dir.join(file);
        fs::write(&path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
    }
}

/// Appends the cgroup directories under `dir`, then `dir`: the order rmdir needs.
fn children_first(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        entries => entries?,
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            children_first(&entry.path(), out)?;
        }
    }
    out.push(dir.to_path_buf());
    Ok(())
}

/// The mount point of a cgroup2 hierarchy that offers both memory and pids.
fn v2_root(mounts: &str) -> Option<PathBuf> {
    mount_points(mounts, "cgroup2")
        .find(|(dir, _)| {
            fs::read_to_string(dir.join("cgroup.controllers")).is_ok_and(|c| {
                let mut names = c.split_whitespace();
                names.clone().any(|n| n == "memory") && names.any(|n| n == "pids")
            })
        })
        .map(|(dir, _)| dir)
}

/// The mount point of the v1 hierarchy that holds `controller`.
fn v1_root(mounts: &str, controller: &str) -> Option<PathBuf> {
    mount_points(mounts, "cgroup")
        .find(|(_, options)| options.split(',').any(|o| o == controller))
        .map(|(dir, _)| dir)
}

/// `(mount point, options)` of every mount of file system type `fs_type`.
fn mount_points<'a>(
    mounts: &'a str,
    fs_type: &'a str,
) -> impl Iterator<Item = (PathBuf, &'a str)> + 'a {
    mounts.lines().filter_map(move |line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, dir, ty, options, ..] if *ty == fs_type => {
                Some((PathBuf::from(unescape_mount_path(dir)), *options))
            }
            _ => None,
        }
    })
}

/// `/proc/self/mounts` writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/net_cls\\040x cgroup rw,net_cls 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn finds_v1_hierarchies_by_controller() {
        assert_eq!(
            v1_root(HYBRID, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(
            v1_root(HYBRID, "pids"),
            Some(PathBuf::from("/sys/fs/cgroup/pids"))
        );
        assert_eq!(
            v1_root(HYBRID, "net_cls"),
            Some(PathBuf::from("/sys/fs/cgroup/net_cls x"))
        );
        assert_eq!(v1_root(HYBRID, "cpu"), None);
    }
}
