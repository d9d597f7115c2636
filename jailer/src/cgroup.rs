//! The VM's cgroup, `<cgroup mount>/<parent>/<id>`: its limits written before the jailed
//! program joins it, and removed after it ends. On cgroup v2 that is one directory of the
//! unified hierarchy, with the controllers the limits name turned on along the way down
//! from the mount; on v1 (a hybrid host, whose v2 hierarchy holds no controller) one
//! directory in the hierarchy of each controller the limits name, as Firecracker's jailer
//! does with `--cgroup-version 1`. A controller the host does not offer is a clear error,
//! never a silent skip.

use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use kindling_plumbing::cgroup::{self, Hierarchies, Joiner};

/// Which cgroup file system holds the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The limits asked for, checked.
#[derive(Debug)]
pub struct Limits {
    version: Version,
    /// Below the cgroup mount: `<parent>/<id>`.
    path: PathBuf,
    /// `(control file, value)`.
    files: Vec<(String, String)>,
}

impl Limits {
    /// `path` relative to the cgroup mount; `files` as `FILE=VALUE`.
    pub fn parse(version: Version, path: PathBuf, files: &[String]) -> anyhow::Result<Limits> {
        let files = files
            .iter()
            .map(|entry| {
                let (file, value) = entry
                    .split_once('=')
                    .with_context(|| format!("--cgroup {entry:?}: FILE=VALUE"))?;
                ensure!(
                    file.split_once('.').is_some_and(|(c, rest)| !c.is_empty()
                        && !rest.is_empty()
                        && !file.contains('/')),
                    "--cgroup {entry:?}: FILE is a control file such as memory.max"
                );
                Ok((file.to_string(), value.to_string()))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Limits {
            version,
            path,
            files,
        })
    }

    /// The controllers the files belong to (`memory` for `memory.max`), sorted, once
    /// each; `cgroup.*` files belong to every cgroup, not to a controller.
    fn controllers(&self) -> Vec<&str> {
        let mut controllers: Vec<&str> = self
            .files
            .iter()
            .filter_map(|(file, _)| file.split_once('.').map(|(c, _)| c))
            .filter(|&c| c != "cgroup")
            .collect();
        controllers.sort_unstable();
        controllers.dedup();
        controllers
    }

    /// Makes the cgroup and writes the limits. An existing cgroup of that id is an error:
    /// another VM may be in it.
    pub fn create(&self) -> anyhow::Result<Cgroup> {
        let found = Hierarchies::read()?;
        match self.version {
            Version::V2 => self.create_v2(&found),
            Version::V1 => self.create_v1(&found),
        }
    }

    fn create_v2(&self, found: &Hierarchies) -> anyhow::Result<Cgroup> {
        let mount = found
            .v2()
            .next()
            .context("no cgroup2 file system is mounted (try --cgroup-version 1)")?;
        let controllers = self.controllers();
        let offered = cgroup::controllers(mount)?;
        if let Some(missing) = controllers
            .iter()
            .find(|c| !offered.iter().any(|o| o == *c))
        {
            bail!(
                "the cgroup2 hierarchy at {} has no {missing} controller (it offers: {}; \
                 a hybrid host holds them in v1: --cgroup-version 1)",
                mount.display(),
                offered.join(" ")
            );
        }
        let dir = mount.join(&self.path);
        ensure!(
            !dir.exists(),
            "cgroup {} exists: another VM has this id",
            dir.display()
        );
        // Each ancestor hands the controllers down to the next, the VM's cgroup last.
        let mut parent = mount.to_path_buf();
        for part in self.path.iter() {
            if !controllers.is_empty() {
                cgroup::enable_controllers(&parent, &controllers)?;
            }
            parent.push(part);
            cgroup::create(&parent)?;
        }
        let mut created = Cgroup::default();
        if let Err(e) = created.add(dir) {
            created.remove();
            return Err(e);
        }
        created.write(self.files.iter())?;
        Ok(created)
    }

    fn create_v1(&self, found: &Hierarchies) -> anyhow::Result<Cgroup> {
        // One hierarchy may hold several controllers (`cpu,cpuacct`): one cgroup each.
        let mut mounts: Vec<&Path> = Vec::new();
        for controller in self.controllers() {
            let mount = found.v1(controller).with_context(|| {
                format!("no cgroup v1 hierarchy is mounted with the {controller} controller")
            })?;
            if !mounts.contains(&mount) {
                mounts.push(mount);
            }
        }
        ensure!(
            !mounts.is_empty(),
            "--cgroup-version 1 needs a controller's file (such as memory.limit_in_bytes)"
        );
        let mut created = Cgroup::default();
        for mount in mounts {
            let dir = mount.join(&self.path);
            if dir.exists() {
                created.remove();
                bail!("cgroup {} exists: another VM has this id", dir.display());
            }
            // v1 hands nothing down: the parents are plain directories of the hierarchy.
            if let Err(e) = cgroup::create_all(&dir).map_err(anyhow::Error::from) {
                created.remove();
                return Err(e);
            }
            if let Err(e) = created.add(dir) {
                created.remove();
                return Err(e);
            }
        }
        // Each file goes to the cgroup of the hierarchy that has it.
        created.write(self.files.iter())?;
        Ok(created)
    }
}

/// The VM's cgroup: its directory, one per hierarchy on v1.
#[derive(Debug, Default)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    joiners: Vec<Joiner>,
}

impl Cgroup {
    fn add(&mut self, dir: PathBuf) -> anyhow::Result<()> {
        let joiner = Joiner::open(&dir);
        self.dirs.push(dir);
        self.joiners.push(joiner?);
        Ok(())
    }

    /// Writes each file into the directory that has it; removes the cgroup on a failure.
    fn write<'a>(
        &self,
        mut files: impl Iterator<Item = &'a (String, String)>,
    ) -> anyhow::Result<()> {
        let failed = files.find_map(|(file, value)| {
            let dir = self
                .dirs
                .iter()
                .find(|dir| dir.join(file).exists())
                .unwrap_or(&self.dirs[0]);
            cgroup::write(dir, file, value).err()
        });
        match failed {
            Some(e) => {
                self.remove();
                Err(e.into())
            }
            None => Ok(()),
        }
    }

    /// What the jailed child joins with, before it drops root: one per directory.
    pub fn joiners(&self) -> &[Joiner] {
        &self.joiners
    }

    /// Removes the cgroup once its processes are gone; the kernel says `EBUSY` for a
    /// moment after the last one died. A cgroup that stays is reported, not fatal.
    pub fn remove(&self) {
        for dir in &self.dirs {
            remove_dir(dir);
        }
    }
}

fn remove_dir(dir: &Path) {
    for _ in 0..50 {
        match cgroup::remove(dir) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("kindling-jailer: {e}");
                return;
            }
            _ => return,
        }
    }
    eprintln!("kindling-jailer: cgroup {} stays busy", dir.display());
}
