//! SnapStart for microVMs: where a function's snapshot lives, which guest it belongs to,
//! who takes it and who may read it.
//!
//! A function's snapshot is two files, the VM's state and its memory, in
//! `<root>/<function>/<digest>/` (and, once its first clone has recorded it, the memory's
//! working set: [`crate::working_set`]), where the digest ([`SnapshotKey`]) covers everything that
//! shapes the guest: hypervisor and its program, kernel, initramfs, drives (the root and
//! code images), command line, memory, vCPUs, and what the host tells the guest at init
//! (runtime, handler, memory, timeout, variables). A snapshot of another digest is stale:
//! it is replaced when the new one is published. The environment's own network lease
//! (address, gateway, resolvers on the command line) is not in the digest: each clone
//! leases its own tap and address, the VMM attaches that tap in place of the snapshot's
//! (`network_overrides`), and the guest is re-addressed on its first event
//! (`kindling_wire::HEADER_NETWORK`). Whether the guest has a network at all is.
//!
//! Who may read them: the memory file holds everything the function's guest had in memory.
//! `<root>` and each function's folder are root's alone (0700), so no host user but root
//! reaches them; the files themselves are root's, read-only for all (0444), and each VM
//! that restores them finds them bind-mounted read-only into its own jail (each VM runs as
//! a user of its own), where nothing else of the host is. The VM taking the snapshot
//! writes into a staging folder of its own user (0700, bound read-write into its jail);
//! once it is done the host takes the files over (root, 0444) and renames the folder into
//! place, so a restorer never sees a half-written snapshot.
//!
//! At most one snapshot of a function is taken at a time by one server ([`Creation`]).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use kindling_runtime_api::environment::Function;

use crate::machine::{VmSpec, VmUser};

/// The snapshot's files in its folder.
const STATE_FILE: &str = "vm.state";
const MEMORY_FILE: &str = "vm.mem";
/// The memory file's working set, once a restored VM has recorded it
/// ([`crate::working_set`]).
const WORKING_SET_FILE: &str = "vm.prefetch";
/// Staging folders start with this (never a digest, which is hex).
const STAGING_PREFIX: &str = ".new-";

/// The files of one snapshot (the working set only once recorded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// The VM's state (vCPUs, devices).
    pub state: PathBuf,
    /// The guest's memory.
    pub memory: PathBuf,
    /// What of the memory a restored guest touches first, once recorded.
    pub working_set: PathBuf,
}

impl SnapshotFiles {
    fn in_dir(dir: &Path) -> Self {
        Self {
            state: dir.join(STATE_FILE),
            memory: dir.join(MEMORY_FILE),
            working_set: dir.join(WORKING_SET_FILE),
        }
    }
}

/// The digest of everything that makes a function's guest what it is when its snapshot
/// is taken: a snapshot restores only into a VM of the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotKey(String);

impl SnapshotKey {
    /// The key of `function`'s guest as `spec` boots it on `hypervisor` (whose `program`
    /// writes and reads the snapshot's format). Files count by path, size and modification
    /// time: the image cache is content-addressed, so a changed image is a new path.
    pub fn new(hypervisor: &str, program: &Path, spec: &VmSpec, function: &Function) -> Self {
        use sha2::{Digest, Sha256};
        let mut text = String::new();
        let mut file = |what: &str, path: &Path| {
            let (len, mtime) = std::fs::metadata(path)
                .map(|m| (m.len(), m.mtime_nsec() + m.mtime() * 1_000_000_000))
                .unwrap_or_default();
            let _ = writeln!(text, "{what} {} {len} {mtime}", path.display());
        };
        file("program", program);
        file("kernel", &spec.kernel);
        file("initramfs", &spec.initramfs);
        for drive in &spec.drives {
            file(
                &format!("drive {} {}", drive.id, drive.read_only),
                &drive.path,
            );
        }
        let _ = writeln!(
            text,
            "hypervisor {hypervisor}\ncmdline {}\nmemory {}\nvcpus {}\ncid {}",
            shared_cmdline(&spec.cmdline),
            spec.memory_mib,
            spec.vcpus,
            spec.guest_cid
        );
        let _ = writeln!(
            text,
            "function {}\nruntime {}\nhandler {}\nmemory_mb {}\ntimeout {:?}\nenv {:?}",
            function.name,
            function.runtime,
            function.handler,
            function.memory_mb,
            function.timeout,
            function.env
        );
        let digest = Sha256::digest(text.as_bytes());
        Self(digest.iter().fold(String::new(), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        }))
    }
}

/// `cmdline` without the words of the environment's own network lease
/// ([`kindling_network::PER_LEASE_KEYS`]): every clone restored from a snapshot has a lease
/// of its own, and is re-addressed to it on its first event. Whether the guest has a network
/// at all (`kindling.net_interface`) stays in.
fn shared_cmdline(cmdline: &str) -> String {
    let per_lease = |word: &&str| {
        kindling_network::PER_LEASE_KEYS.iter().any(|key| {
            word.strip_prefix("kindling.")
                .and_then(|rest| rest.strip_prefix(key))
                .is_some_and(|rest| rest.starts_with('='))
        })
    };
    cmdline
        .split(' ')
        .filter(|word| !per_lease(word))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The snapshots of one server's functions, under `<state>/snapshots`.
#[derive(Debug)]
pub struct SnapshotStore {
    root: PathBuf,
    /// Functions whose snapshot is being taken now.
    creating: Arc<Mutex<HashSet<String>>>,
}

impl SnapshotStore {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            creating: Arc::default(),
        }
    }

    /// `function`'s folder, root's alone.
    fn function_dir(&self, function: &str) -> anyhow::Result<PathBuf> {
        let dir = self.root.join(function);
        kindling_plumbing::dirs::create_all(&dir, 0o700)?;
        for folder in [&self.root, &dir] {
            std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o700))
                .with_context(|| folder.display().to_string())?;
        }
        Ok(dir)
    }

    /// `function`'s published snapshot of `key`, if there is one.
    pub fn find(&self, function: &str, key: &SnapshotKey) -> Option<SnapshotFiles> {
        let files = SnapshotFiles::in_dir(&self.root.join(function).join(&key.0));
        (files.state.is_file() && files.memory.is_file()).then_some(files)
    }

    /// Removes a snapshot that failed to restore, so that the next cold start boots and
    /// takes a fresh one. Clones restored from it before keep their open files.
    pub fn discard(&self, files: &SnapshotFiles) {
        if let Some(dir) = files.state.parent() {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a snapshot");
            }
        }
    }

    /// The right to take `function`'s snapshot of `key` in a VM running as `user`: a
    /// staging folder that user may write. `None` while another of its environments
    /// holds that right.
    pub fn claim(
        &self,
        function: &str,
        key: &SnapshotKey,
        user: VmUser,
    ) -> anyhow::Result<Option<Creation>> {
        if !self
            .creating
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(function.to_string())
        {
            return Ok(None);
        }
        // From here on, dropping `creation` gives the right back and removes the folder.
        let mut creation = Creation {
            creating: self.creating.clone(),
            function: function.to_string(),
            staging: PathBuf::new(),
            published: self.root.join(function).join(&key.0),
        };
        let dir = self.function_dir(function)?;
        creation.staging = dir.join(format!(
            "{STAGING_PREFIX}{}-{}",
            std::process::id(),
            user.uid
        ));
        let _ = std::fs::remove_dir_all(&creation.staging);
        std::fs::create_dir(&creation.staging)
            .with_context(|| creation.staging.display().to_string())?;
        std::os::unix::fs::chown(&creation.staging, Some(user.uid), Some(user.gid))?;
        std::fs::set_permissions(&creation.staging, std::fs::Permissions::from_mode(0o700))?;
        Ok(Some(creation))
    }
}

/// The right to take one function's snapshot, and the folder its VM writes it into.
/// Dropped unpublished, it removes that folder.
#[derive(Debug)]
pub struct Creation {
    creating: Arc<Mutex<HashSet<String>>>,
    function: String,
    /// Written by the VM (its user's, bound read-write into its jail).
    staging: PathBuf,
    /// Where the snapshot goes once it is complete.
    published: PathBuf,
}

impl Creation {
    /// The folder the VM writes into.
    pub fn staging_dir(&self) -> &Path {
        &self.staging
    }

    /// Where the VM writes the snapshot.
    pub fn files(&self) -> SnapshotFiles {
        SnapshotFiles::in_dir(&self.staging)
    }

    /// Takes the files over from the VM's user (root's, read-only for all: see the module
    /// doc for who reaches them) and makes them the function's snapshot, replacing any of
    /// another digest.
    pub fn publish(self) -> anyhow::Result<SnapshotFiles> {
        let files = self.files();
        for path in [&files.state, &files.memory] {
            std::os::unix::fs::chown(path, Some(0), Some(0))
                .with_context(|| path.display().to_string())?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))?;
        }
        std::os::unix::fs::chown(&self.staging, Some(0), Some(0))?;
        std::fs::set_permissions(&self.staging, std::fs::Permissions::from_mode(0o755))?;
        let _ = std::fs::remove_dir_all(&self.published);
        std::fs::rename(&self.staging, &self.published).with_context(|| {
            format!("{} -> {}", self.staging.display(), self.published.display())
        })?;
        self.remove_stale();
        Ok(SnapshotFiles::in_dir(&self.published))
    }

    /// Removes the function's snapshots of other digests (not the staging folders of
    /// snapshots being taken).
    fn remove_stale(&self) {
        let Some(dir) = self.published.parent() else {
            return;
        };
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let stale = entry.path() != self.published
                && !entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(STAGING_PREFIX);
            if stale {
                tracing::info!(function = %self.function, snapshot = %entry.path().display(), "removing a stale snapshot");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

impl Drop for Creation {
    fn drop(&mut self) {
        // Gone already once published.
        let _ = std::fs::remove_dir_all(&self.staging);
        self.creating
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.function);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Drive;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn spec(dir: &Path) -> VmSpec {
        let file = |name: &str| {
            let path = dir.join(name);
            std::fs::write(&path, name).unwrap();
            path
        };
        VmSpec {
            kernel: file("bzImage"),
            initramfs: file("initramfs"),
            cmdline: "console=ttyS0".into(),
            drives: vec![Drive {
                id: "root".into(),
                path: file("root.ext4"),
                read_only: true,
            }],
            memory_mib: 128,
            vcpus: 1,
            guest_cid: 3,
            vsock_uds: dir.join("v.sock"),
            console_log: dir.join("console.log"),
            work_dir: dir.to_path_buf(),
            socket_dir: dir.to_path_buf(),
            user: VmUser {
                uid: 900_000,
                gid: 900_000,
            },
            snapshot_dir: None,
            tap: None,
        }
    }

    fn function() -> Function {
        Function {
            name: "f".into(),
            code: PathBuf::from("/code"),
            runtime: "python".into(),
            handler: "app.handler".into(),
            memory_mb: 128,
            timeout: Duration::from_secs(3),
            isolation: kindling_runtime_api::Isolation::MicroVm,
            max_concurrency: 1,
            env: BTreeMap::new(),
            snapstart: true,
            network: kindling_runtime_api::environment::Network::Outbound,
            layers: Vec::new(),
            credentials: None,
        }
    }

    #[test]
    fn the_key_follows_what_shapes_the_guest_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("vmm");
        std::fs::write(&program, "vmm").unwrap();
        let spec = spec(dir.path());
        let f = function();
        let key = SnapshotKey::new("kindling", &program, &spec, &f);
        assert_eq!(key, SnapshotKey::new("kindling", &program, &spec, &f));
        // Another environment of the function: other sockets, user and console.
        let mut other_env = spec.clone();
        other_env.socket_dir = PathBuf::from("/elsewhere");
        other_env.vsock_uds = PathBuf::from("/elsewhere/v.sock");
        other_env.user = VmUser { uid: 1, gid: 1 };
        assert_eq!(key, SnapshotKey::new("kindling", &program, &other_env, &f));
        let more_concurrency = Function {
            max_concurrency: 9,
            ..f.clone()
        };
        assert_eq!(
            key,
            SnapshotKey::new("kindling", &program, &spec, &more_concurrency)
        );
        let mut bigger = spec.clone();
        bigger.memory_mib = 256;
        let mut env = f.clone();
        env.env.insert("K".into(), "v".into());
        let handler = Function {
            handler: "app.other".into(),
            ..f.clone()
        };
        for changed in [
            SnapshotKey::new("qemu", &program, &spec, &f),
            SnapshotKey::new("kindling", &program, &bigger, &f),
            SnapshotKey::new("kindling", &program, &spec, &env),
            SnapshotKey::new("kindling", &program, &spec, &handler),
        ] {
            assert_ne!(key, changed);
        }
        // Networked: another lease is the same guest; no network, or another
        // interface, is not.
        let networked = |words: &str| {
            let mut spec = spec.clone();
            spec.cmdline = format!("console=ttyS0 kindling.net_interface=eth0 {words}");
            SnapshotKey::new("kindling", &program, &spec, &f)
        };
        let lease = networked(
            "kindling.net_address=10.200.0.2/30 kindling.net_gateway=10.200.0.1 kindling.nameservers=192.0.2.53",
        );
        assert_eq!(
            lease,
            networked("kindling.net_address=10.200.0.6/30 kindling.net_gateway=10.200.0.5 kindling.nameservers=192.0.2.54,192.0.2.55")
        );
        assert_ne!(lease, key);
        assert_ne!(lease, networked("kindling.net_interface_x=1"));
        let mut other_interface = spec.clone();
        other_interface.cmdline = "console=ttyS0 kindling.net_interface=eth1".into();
        assert_ne!(
            lease,
            SnapshotKey::new("kindling", &program, &other_interface, &f)
        );
        std::fs::write(&spec.drives[0].path, "a rebuilt root image").unwrap();
        assert_ne!(key, SnapshotKey::new("kindling", &program, &spec, &f));
    }

    #[test]
    fn a_snapshot_is_claimed_once_published_root_only_and_replaces_stale_ones() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path().join("snapshots"));
        let program = dir.path().join("vmm");
        std::fs::write(&program, "vmm").unwrap();
        let spec = spec(dir.path());
        let old = SnapshotKey::new("kindling", &program, &spec, &function());
        let user = VmUser {
            uid: 900_001,
            gid: 900_001,
        };
        // An older snapshot of the function.
        let first = store.claim("f", &old, user).unwrap().unwrap();
        for path in [first.files().state, first.files().memory] {
            std::fs::write(path, "old").unwrap();
        }
        first.publish().unwrap();
        assert!(store.find("f", &old).is_some());

        let mut changed = spec.clone();
        changed.memory_mib = 256;
        let key = SnapshotKey::new("kindling", &program, &changed, &function());
        assert!(store.find("f", &key).is_none());
        let creation = store.claim("f", &key, user).unwrap().unwrap();
        assert!(
            store.claim("f", &key, user).unwrap().is_none(),
            "claimed twice"
        );
        let staging = creation.staging_dir().to_path_buf();
        let meta = std::fs::metadata(&staging).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (user.uid, 0o700));
        for path in [creation.files().state, creation.files().memory] {
            std::fs::write(path, "new").unwrap();
        }
        let files = creation.publish().unwrap();
        assert_eq!(store.find("f", &key), Some(files.clone()));
        assert!(store.find("f", &old).is_none(), "the stale snapshot stayed");
        assert!(!staging.exists());
        for path in [&files.state, &files.memory] {
            let meta = std::fs::metadata(path).unwrap();
            assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o444));
        }
        for folder in [dir.path().join("snapshots"), dir.path().join("snapshots/f")] {
            assert_eq!(std::fs::metadata(folder).unwrap().mode() & 0o777, 0o700);
        }
        // Free to claim again; an unpublished claim leaves nothing behind.
        let again = store.claim("f", &key, user).unwrap().unwrap();
        let staging = again.staging_dir().to_path_buf();
        drop(again);
        assert!(!staging.exists());
        store.discard(&files);
        assert!(store.find("f", &key).is_none());
    }
}
