//! Pools of host ids handed out one at a time and given back on drop: each VM's own uid
//! (the microVM launcher) and each sandbox's range of mapped ids (the sandbox launcher), so
//! that no two running environments share a host identity — across servers too. A lease
//! is an exclusive `flock` on `<LOCK_ROOT>/<pool>/<id>.lock`: servers running side by side
//! never hand out the same id, and a crashed server's ids come free with its locks.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::Error;

/// Where every pool keeps its lock files, shared by every server on the host.
pub const LOCK_ROOT: &str = "/run/kindling-ids";

/// A pool of numbers, for a `static`.
#[derive(Debug)]
pub struct IdPool {
    /// Names the pool's folder under [`LOCK_ROOT`].
    name: &'static str,
    ids: Range<u32>,
}

/// Why no id was taken.
#[derive(Debug)]
pub enum TakeError {
    /// Every number of the pool is held by a running environment, here or in another
    /// server on the host.
    Exhausted { size: usize },
    /// A lock file could not be made or locked.
    Lock(Error),
}

impl std::fmt::Display for TakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TakeError::Exhausted { size } => write!(f, "all {size} ids are in use"),
            TakeError::Lock(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for TakeError {}

impl IdPool {
    pub const fn new(name: &'static str, ids: Range<u32>) -> Self {
        Self { name, ids }
    }

    /// The lowest number no server holds, held until the lease is dropped.
    pub fn take(&'static self) -> Result<IdLease, TakeError> {
        self.take_in(Path::new(LOCK_ROOT))
    }

    fn take_in(&self, root: &Path) -> Result<IdLease, TakeError> {
        let dir = root.join(self.name);
        fs::create_dir_all(&dir).map_err(|e| TakeError::Lock(Error::new("creating", &dir, e)))?;
        for id in self.ids.clone() {
            if let Some(lock) = try_lock(&dir.join(format!("{id}.lock")))? {
                return Ok(IdLease { id, _lock: lock });
            }
        }
        Err(TakeError::Exhausted {
            size: self.ids.len(),
        })
    }
}

/// Locks `path`, or `None` if another lease (of any process) holds it. A lock is per
/// open file, so a second lease in this process is refused as well.
fn try_lock(path: &PathBuf) -> Result<Option<Flock<File>>, TakeError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| TakeError::Lock(Error::new("opening", path, e)))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(TakeError::Lock(Error::new(
            "locking",
            path,
            io::Error::from(e),
        ))),
    }
}

/// One number of an [`IdPool`], given back when dropped (its lock file is closed).
#[derive(Debug)]
pub struct IdLease {
    id: u32,
    _lock: Flock<File>,
}

impl IdLease {
    pub fn id(&self) -> u32 {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_while_held_and_come_back_on_drop() {
        let root = std::env::temp_dir().join(format!("kindling-ids-{}", std::process::id()));
        let pool = IdPool::new("test", 10..12);
        let a = pool.take_in(&root).unwrap();
        let b = pool.take_in(&root).unwrap();
        assert_eq!((a.id(), b.id()), (10, 11));
        assert!(matches!(
            pool.take_in(&root),
            Err(TakeError::Exhausted { size: 2 })
        ));
        drop(a);
        assert_eq!(pool.take_in(&root).unwrap().id(), 10);
        fs::remove_dir_all(&root).unwrap();
    }

    /// Another process holding an id (another server) keeps it from this one.
    #[test]
    fn an_id_another_process_holds_is_skipped() {
        let root = std::env::temp_dir().join(format!("kindling-ids-x-{}", std::process::id()));
        let dir = root.join("test");
        fs::create_dir_all(&dir).unwrap();
        // `--no-fork`: flock(1) becomes the sleep, so killing it lets the lock go.
        let mut holder = std::process::Command::new("flock")
            .arg("--no-fork")
            .arg(dir.join("20.lock"))
            .args(["sleep", "30"])
            .spawn()
            .unwrap();
        // flock(1) takes the lock right after it starts.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while try_lock(&dir.join("20.lock")).unwrap().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "flock(1) never locked"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let pool = IdPool::new("test", 20..22);
        assert_eq!(pool.take_in(&root).unwrap().id(), 21);
        holder.kill().unwrap();
        holder.wait().unwrap();
        assert_eq!(pool.take_in(&root).unwrap().id(), 20);
        fs::remove_dir_all(&root).unwrap();
    }
}
