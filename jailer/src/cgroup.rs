//! The VM's cgroup v2: `<cgroup2 mount>/<parent>/<id>`, its limits written before the
//! jailed program joins it, and removed after it ends. Controllers the limits name are
//! turned on along the way down from the mount; one the hierarchy does not offer (on a
//! hybrid host, the v1 hierarchies hold them) is a clear error, never a silent skip.

use std::path::PathBuf;
use std::thread::sleep;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use kindling_plumbing::cgroup::{self, Joiner};
use kindling_plumbing::mount_table::unescape;

/// The limits asked for, checked.
#[derive(Debug)]
pub struct Limits {
    /// Below the cgroup2 mount: `<parent>/<id>`.
    path: PathBuf,
    /// `(control file, value)`.
    files: Vec<(String, String)>,
}

impl Limits {
    /// `path` relative to the cgroup2 mount; `files` as `FILE=VALUE`.
    pub fn parse(path: PathBuf, files: &[String]) -> anyhow::Result<Limits> {
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
        Ok(Limits { path, files })
    }

    /// Makes the cgroup and writes the limits. An existing cgroup of that id is an error:
    /// another VM may be in it.
    pub fn create(&self) -> anyhow::Result<Cgroup> {
        let mount = cgroup2_mount()?;
        let mut controllers: Vec<&str> = self
            .files
            .iter()
            .filter_map(|(file, _)| file.split_once('.').map(|(c, _)| c))
            .filter(|&c| c != "cgroup")
            .collect();
        controllers.sort_unstable();
        controllers.dedup();
        let offered = cgroup::controllers(&mount)?;
        if let Some(missing) = controllers
            .iter()
            .find(|c| !offered.iter().any(|o| o == *c))
        {
            bail!(
                "the cgroup2 hierarchy at {} has no {missing} controller (it offers: {})",
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
        let mut parent = mount.clone();
        for part in self.path.iter() {
            if !controllers.is_empty() {
                cgroup::enable_controllers(&parent, &controllers)?;
            }
            parent.push(part);
            cgroup::create(&parent)?;
        }
        let created = Cgroup {
            joiner: Joiner::open(&dir)?,
            dir,
        };
        for (file, value) in &self.files {
            if let Err(e) = cgroup::write(&created.dir, file, value) {
                created.remove();
                return Err(e.into());
            }
        }
        Ok(created)
    }
}

/// The first cgroup2 mount of `/proc/self/mounts`.
fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split(' ');
            let point = fields.nth(1)?;
            (fields.next() == Some("cgroup2")).then(|| PathBuf::from(unescape(point)))
        })
        .context("no cgroup2 file system is mounted (--cgroup needs cgroup v2)")
}

/// The VM's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
    joiner: Joiner,
}

impl Cgroup {
    /// What the jailed child joins with, before it drops root.
    pub fn joiner(&self) -> &Joiner {
        &self.joiner
    }

    /// Removes the cgroup once its processes are gone; the kernel says `EBUSY` for a
    /// moment after the last one died. A cgroup that stays is reported, not fatal.
    pub fn remove(self) {
        for _ in 0..50 {
            match cgroup::remove(&self.dir) {
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
        eprintln!("kindling-jailer: cgroup {} stays busy", self.dir.display());
    }
}
