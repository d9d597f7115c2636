//! The launch plan: everything the host side decides, written as JSON for the
//! single-threaded `kindling-sandbox-exec`, which only carries it out. Keeping the
//! decisions on the host side keeps the code that runs between `fork` and `exec` small.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the guest finds the host's Runtime API socket (a bind mount of the host's).
pub const GUEST_HOST_SOCKET: &str = "/run/kindling/host.sock";
/// Where the guest's `init` binary is bind-mounted.
pub const GUEST_INIT: &str = "/run/kindling/init";
/// Where init's JSON configuration is bind-mounted.
pub const GUEST_INIT_CONFIG: &str = "/run/kindling/init.json";
/// The runtime's shims and `kindling-bootstrap`.
pub const GUEST_RUNTIME_DIR: &str = "/var/runtime";
/// The function's code.
pub const GUEST_TASK_DIR: &str = "/var/task";

/// Read-only views of host paths, by entry name in the directory they appear in.
///
/// A source that is a symlink is recreated as the same symlink (so a merged-`/usr`
/// host's `/bin -> usr/bin` stays a link); a directory or a file is bind-mounted read-only.
pub type Entries = BTreeMap<String, PathBuf>;

/// One sandbox, as the exec helper builds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// An empty host directory on which the new root is assembled inside the new
    /// mount namespace (the host never sees anything mounted on it).
    pub staging: PathBuf,
    /// The top-level entries of the new root (`usr`, `bin`, `etc`, ...).
    pub root: Entries,
    /// The entries of `/var/runtime`.
    pub runtime: Entries,
    /// The function's code directory, mounted read-only at `/var/task`.
    pub task: PathBuf,
    /// The host's Runtime API socket, bind-mounted at [`GUEST_HOST_SOCKET`].
    pub host_socket: PathBuf,
    /// The static `init` binary, bind-mounted at [`GUEST_INIT`].
    pub init: PathBuf,
    /// Init's configuration file, bind-mounted at [`GUEST_INIT_CONFIG`].
    pub init_config: PathBuf,
    pub hostname: String,
    /// Size of the fresh `/tmp` tmpfs.
    pub tmp_size_mb: u32,
    /// `cgroup.procs` files the helper joins before it forks, so that init and all its
    /// descendants are accounted and limited from their first instruction.
    pub cgroup_procs: Vec<PathBuf>,
    /// The host ids that the sandbox's user namespace maps its ids 0.. onto.
    pub id_map: IdMap,
    /// cgroup directories handed to the sandbox's root (their `cgroup.procs`,
    /// `cgroup.threads` and `cgroup.subtree_control`, so that init can make and fill its
    /// workload cgroup); the limits in them stay the host's.
    pub delegate: Vec<PathBuf>,
    /// The host process that ran the helper: the helper dies with it (`PR_SET_PDEATHSIG`,
    /// which the helper sets itself, so the host can spawn it without a fork of its own)
    /// and ends at once if that process is already gone.
    pub host_pid: u32,
}

/// A user namespace's mapping: ids `0..count` inside are `host_base..host_base + count`
/// on the host, for users and groups alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub host_base: u32,
    pub count: u32,
}

impl IdMap {
    /// The host id of id 0 inside: the sandbox's root, who owns what is handed to it.
    pub fn root(&self) -> u32 {
        self.host_base
    }

    /// The line `/proc/<pid>/uid_map` and `gid_map` take.
    pub fn line(&self) -> String {
        format!("0 {} {}\n", self.host_base, self.count)
    }
}

/// First line the helper prints on stdout once init runs: `ready <host pid of init>
/// <CLOCK_MONOTONIC ns when init's exec was seen>`. The stamp is the keeper's: the host may
/// read the line late, when init has started the agent already.
pub const STATUS_READY: &str = "ready";
/// First line when the sandbox could not be built: `error <one-line reason>`.
pub const STATUS_ERROR: &str = "error";
/// Last line once init has gone: `exited <one-line reason>`.
pub const STATUS_EXITED: &str = "exited";
