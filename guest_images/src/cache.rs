//! The content-addressed cache every artifact lives in.
//!
//! Layout under the cache root (`$XDG_CACHE_HOME/kindling`, default `~/.cache/kindling`):
//!
//! ```text
//! <kind>/<name>-<key>/   one finished artifact (kernel/, initramfs/, base/, rootfs/, code/,
//!                        nested/: the nested-KVM harness's level-1 host)
//! tmp/                   artifacts being built; never read, removed by `prune`
//! locks/                 one lock file per entry, held while it is built
//! logs/                  the output of the last run of each external build step
//! debs/                  debootstrap's package cache
//! stamps/                remembered SHA-256 digests of input files, by path and ctime
//! ```
//!
//! An entry's key hashes everything it is built from, so an entry that exists is valid:
//! builders write into `tmp/` and rename the finished folder into place, and an interrupted
//! build leaves only a `tmp/` folder that no lookup ever sees.

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use walkdir::WalkDir;

use crate::progress::{Progress, Step};

/// Bumped when a builder changes what it produces, so old entries stop matching.
pub(crate) const RECIPE_VERSION: &str = "kindling-images/1";

/// Hex digits of the SHA-256 kept in entry names: enough to never collide in one cache.
const KEY_LEN: usize = 16;

/// The kinds of entry, each a folder under the cache root.
pub(crate) const KINDS: [&str; 6] = ["kernel", "initramfs", "base", "rootfs", "code", "nested"];

/// A cache folder holding built artifacts. Every build is given one, so it also carries
/// where builds report their long steps.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    progress: Option<Arc<dyn Progress>>,
}

/// What a lookup-or-build gave: the entry's folder and whether it was already there.
#[derive(Debug, Clone)]
pub struct Built {
    pub path: PathBuf,
    pub cached: bool,
    pub elapsed: Duration,
}

/// One finished entry, as `kindling images list` shows it.
#[derive(Debug, Clone)]
pub struct EntryInfo {
    pub kind: String,
    pub name: String,
    pub path: PathBuf,
    pub bytes: u64,
}

impl Cache {
    /// The user's cache: `$XDG_CACHE_HOME/kindling`, else `~/.cache/kindling`.
    pub fn open() -> Result<Cache> {
        let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => {
                let home =
                    std::env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?;
                PathBuf::from(home).join(".cache")
            }
        };
        Cache::at(base.join("kindling"))
    }

    /// A cache rooted at `root` (created if missing).
    pub fn at(root: impl Into<PathBuf>) -> Result<Cache> {
        let root = root.into();
        for sub in ["tmp", "logs"] {
            fs::create_dir_all(root.join(sub))
                .with_context(|| format!("cannot create the cache folder {}", root.display()))?;
        }
        Ok(Cache {
            root,
            progress: None,
        })
    }

    /// The same cache, with builds showing their long steps on `progress` (without one,
    /// only `tracing` hears of them).
    pub fn with_progress(self, progress: Arc<dyn Progress>) -> Cache {
        Cache {
            progress: Some(progress),
            ..self
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Starts a long build step, shown on this cache's progress.
    pub(crate) fn step(&self, what: impl Into<String>) -> Step {
        Step::start(self.progress.as_deref(), what)
    }

    /// Where the entry `kind/name` lives once built.
    pub(crate) fn entry(&self, kind: &str, name: &str) -> PathBuf {
        self.root.join(kind).join(name)
    }

    /// An empty log for the external steps of building `name` (the last build's log
    /// stays for inspection).
    pub(crate) fn fresh_log(&self, name: &str) -> Result<PathBuf> {
        let path = self.root.join("logs").join(format!("{name}.log"));
        fs::write(&path, b"").with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// A fresh, empty scratch folder under `tmp/`; the caller removes it.
    pub(crate) fn scratch(&self, label: &str) -> Result<PathBuf> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let dir = self
            .root
            .join("tmp")
            .join(format!("{label}.{}.{nanos}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// A fingerprint whose file digests are remembered in this cache.
    pub(crate) fn fingerprint(&self, what: &str) -> Fingerprint {
        let mut fp = Fingerprint::new(what);
        fp.stamps = Some(self.root.join("stamps"));
        fp
    }

    /// The SHA-256 of a file (hex), remembered while the file is unchanged.
    pub(crate) fn file_digest(&self, path: &Path) -> Result<String> {
        digest_remembered(Some(&self.root.join("stamps")), path)
    }

    /// Returns the entry `kind/name`, building it first with `build` (which fills the
    /// empty folder it is given) when it is not cached yet.
    pub(crate) fn get_or_build(
        &self,
        kind: &str,
        name: &str,
        build: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Built> {
        let started = Instant::now();
        let path = self.entry(kind, name);
        let hit = |path: PathBuf| Built {
            path,
            cached: true,
            elapsed: started.elapsed(),
        };
        if path.is_dir() {
            return Ok(hit(path));
        }
        // One builder per entry across processes: the others wait here, then find it built.
        let locks = self.root.join("locks");
        fs::create_dir_all(&locks)?;
        let mut lock =
            fd_lock::RwLock::new(fs::File::create(locks.join(format!("{kind}-{name}.lock")))?);
        let _guard = lock.write().context("cannot lock the cache entry")?;
        if path.is_dir() {
            return Ok(hit(path));
        }
        let staging = self.scratch(name)?;
        if let Err(err) = build(&staging) {
            remove_tree(&staging)?;
            return Err(err);
        }
        fs::create_dir_all(path.parent().expect("entries live in a kind folder"))?;
        if let Err(err) = fs::rename(&staging, &path) {
            remove_tree(&staging)?;
            return Err(err).with_context(|| format!("cannot publish {}", path.display()));
        }
        Ok(Built {
            path,
            cached: false,
            elapsed: started.elapsed(),
        })
    }

    /// Every finished entry, by kind then name.
    pub fn list(&self) -> Result<Vec<EntryInfo>> {
        let mut entries = Vec::new();
        for kind in KINDS {
            let dir = self.root.join(kind);
            let Ok(read) = fs::read_dir(&dir) else {
                continue;
            };
            let mut names: Vec<_> = read.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
            names.sort();
            for name in names {
                let path = dir.join(&name);
                entries.push(EntryInfo {
                    kind: kind.to_string(),
                    name: name.to_string_lossy().into_owned(),
                    bytes: tree_bytes(&path),
                    path,
                });
            }
        }
        Ok(entries)
    }

    /// Removes unfinished builds and every entry for which `keep` says no; returns what
    /// was removed.
    pub fn prune(&self, keep: impl Fn(&EntryInfo) -> bool) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for tmp in fs::read_dir(self.root.join("tmp"))?.filter_map(|e| e.ok()) {
            if builder_alive(&tmp.file_name().to_string_lossy()) {
                continue;
            }
            remove_tree(&tmp.path())?;
            removed.push(tmp.path());
        }
        for entry in self.list()? {
            if !keep(&entry) {
                remove_tree(&entry.path)?;
                removed.push(entry.path);
            }
        }
        Ok(removed)
    }
}

/// Whether the process that made the scratch folder `name` (`<label>.<pid>.<nanos>`) is
/// still running, so that prune leaves a build in progress alone.
fn builder_alive(name: &str) -> bool {
    let pid = name.rsplit('.').nth(1).and_then(|p| p.parse::<u32>().ok());
    pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// Disk usage of a file or folder tree, in bytes: allocated blocks, so the sparse ext4
/// images count for what they really take (symlinks not followed).
pub(crate) fn tree_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    WalkDir::new(path)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Removes a folder tree, first unmounting anything left mounted inside it (an
/// interrupted debootstrap leaves `proc` and `sys` mounted in its target, and deleting
/// through those mounts would be a disaster).
pub(crate) fn remove_tree(path: &Path) -> Result<()> {
    let mounts = mounts_under(path)?;
    for mount in mounts.iter().rev() {
        let status = Command::new("umount").arg("--lazy").arg(mount).status()?;
        if !status.success() {
            bail!(
                "cannot unmount {} (left inside {}); not removing it",
                mount.display(),
                path.display()
            );
        }
    }
    match fs::remove_dir_all(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other.with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// Mount points at or below `path`, outermost first.
fn mounts_under(path: &Path) -> Result<Vec<PathBuf>> {
    let Ok(path) = path.canonicalize() else {
        return Ok(Vec::new());
    };
    let info =
        fs::File::open("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    let mut found = Vec::new();
    for line in BufReader::new(info).lines() {
        // Field 5 is the mount point, with spaces and the like written as octal escapes.
        if let Some(point) = line?.split(' ').nth(4) {
            let point = PathBuf::from(unescape_mountinfo(point));
            if point.starts_with(&path) {
                found.push(point);
            }
        }
    }
    found.sort();
    Ok(found)
}

fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Builds a cache key from labelled inputs; the label keeps `("a", "bc")` and
/// `("ab", "c")` apart.
pub(crate) struct Fingerprint {
    hasher: Sha256,
    /// Where file digests are remembered (see [`Cache::file_digest`]).
    stamps: Option<PathBuf>,
}

impl Fingerprint {
    /// A fingerprint that hashes every file it is given in full.
    pub(crate) fn new(what: &str) -> Fingerprint {
        let mut fp = Fingerprint {
            hasher: Sha256::new(),
            stamps: None,
        };
        fp.bytes("recipe", RECIPE_VERSION.as_bytes());
        fp.bytes("what", what.as_bytes());
        fp
    }

    pub(crate) fn bytes(&mut self, label: &str, data: &[u8]) -> &mut Fingerprint {
        for part in [label.as_bytes(), data] {
            self.hasher.update((part.len() as u64).to_le_bytes());
            self.hasher.update(part);
        }
        self
    }

    pub(crate) fn str(&mut self, label: &str, data: &str) -> &mut Fingerprint {
        self.bytes(label, data.as_bytes())
    }

    /// The contents of one file.
    pub(crate) fn file(&mut self, label: &str, path: &Path) -> Result<&mut Fingerprint> {
        let digest = digest_remembered(self.stamps.as_deref(), path)?;
        Ok(self.str(label, &digest))
    }

    /// A folder tree: relative paths, types, permission bits, contents and link targets.
    pub(crate) fn tree(&mut self, label: &str, root: &Path) -> Result<&mut Fingerprint> {
        use std::os::unix::fs::PermissionsExt;
        self.str("tree", label);
        for entry in WalkDir::new(root).sort_by_file_name() {
            let entry = entry.with_context(|| format!("cannot read {}", root.display()))?;
            let rel = entry
                .path()
                .strip_prefix(root)
                .expect("walk stays below its root");
            let meta = entry.metadata()?;
            self.str("path", &rel.to_string_lossy());
            self.str("mode", &format!("{:o}", meta.permissions().mode()));
            if meta.is_file() {
                self.file("data", entry.path())?;
            } else if meta.is_symlink() {
                self.str("link", &fs::read_link(entry.path())?.to_string_lossy());
            }
        }
        Ok(self)
    }

    /// The key: the first hex digits of the digest.
    pub(crate) fn key(&self) -> String {
        hex(&self.hasher.clone().finalize())[..KEY_LEN].to_string()
    }
}

/// The SHA-256 of a file, reusing the digest remembered in `stamps` while the file's
/// identity and change times are the same (ctime moves on every write, and no one can set
/// it back), so a cache hit does not rehash megabytes of guest binaries or code.
fn digest_remembered(stamps: Option<&Path>, path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let Some(stamps) = stamps else {
        return file_sha256(path);
    };
    let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let identity = format!(
        "{} {} {} {} {} {} {}",
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    let mut name = Sha256::new();
    name.update(path.as_os_str().as_encoded_bytes());
    let stamp = stamps.join(&hex(&name.finalize())[..32]);
    if let Some((seen, digest)) = fs::read_to_string(&stamp)
        .ok()
        .as_deref()
        .and_then(|s| s.rsplit_once('\n'))
    {
        if seen == identity {
            return Ok(digest.to_string());
        }
    }
    let digest = file_sha256(path)?;
    fs::create_dir_all(stamps)?;
    let partial = stamp.with_extension(format!("{}", std::process::id()));
    fs::write(&partial, format!("{identity}\n{digest}"))?;
    fs::rename(&partial, &stamp)?;
    Ok(digest)
}

/// The SHA-256 of `data`, in hex, as [`Fingerprint::file`] records a file's contents.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The SHA-256 of a file, in hex.
fn file_sha256(path: &Path) -> Result<String> {
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_build_leaves_no_entry_and_retry_builds() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path()).unwrap();
        let err = cache
            .get_or_build("code", "x-1", |d| {
                fs::write(d.join("half"), b"half")?;
                bail!("interrupted")
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "interrupted");
        assert!(!cache.entry("code", "x-1").exists());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

        let first = cache
            .get_or_build("code", "x-1", |d| Ok(fs::write(d.join("f"), b"ok")?))
            .unwrap();
        assert!(!first.cached);
        let second = cache
            .get_or_build("code", "x-1", |_| bail!("must not rebuild"))
            .unwrap();
        assert!(second.cached);
        assert_eq!(fs::read(second.path.join("f")).unwrap(), b"ok");
    }

    #[test]
    fn fingerprint_labels_separate_inputs() {
        let a = Fingerprint::new("t").str("a", "bc").key();
        let b = Fingerprint::new("t").str("ab", "c").key();
        assert_ne!(a, b);
        assert_eq!(a, Fingerprint::new("t").str("a", "bc").key());
    }

    #[test]
    fn remembered_digest_follows_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path().join("c")).unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"one").unwrap();
        let first = cache.file_digest(&file).unwrap();
        assert_eq!(first, file_sha256(&file).unwrap());
        assert_eq!(cache.file_digest(&file).unwrap(), first);
        fs::write(&file, b"two").unwrap();
        assert_eq!(
            cache.file_digest(&file).unwrap(),
            file_sha256(&file).unwrap()
        );
        assert_ne!(cache.file_digest(&file).unwrap(), first);
    }

    #[test]
    fn concurrent_builders_of_one_entry_build_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path()).unwrap();
        let builds = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<Built> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        cache
                            .get_or_build("code", "same-1", |d| {
                                builds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(200));
                                Ok(fs::write(d.join("f"), b"x")?)
                            })
                            .unwrap()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        assert_eq!(builds.into_inner(), 1);
        assert_eq!(results.iter().filter(|b| !b.cached).count(), 1);
    }

    #[test]
    fn prune_spares_builds_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path()).unwrap();
        let mine = cache.scratch("x-1").unwrap();
        let dead = dir.path().join("tmp/x-1.4294967295.1");
        fs::create_dir(&dead).unwrap();
        let removed = cache.prune(|_| true).unwrap();
        assert_eq!(removed, [dead]);
        assert!(mine.is_dir());
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), r"/a b\c");
    }
}
