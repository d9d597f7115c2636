//! Peak memory of the runtime's process tree.
//!
//! Preferred: a cgroup created for each runtime start, whose kernel-kept peak counts every
//! process of the tree, even those that already exited (v2 `memory.peak`, or v1
//! `memory.max_usage_in_bytes` where the memory controller is only on v1). Where no cgroup
//! can be created, the highest `VmHWM` over the live tree, remembered across reads.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kindling_plumbing::cgroup::{self, Joiner};

const MIB: u64 = 1024 * 1024;

/// How many processes the kernel's OOM killer has ended (`oom_kill` in /proc/vmstat,
/// Linux 4.13+): a runtime SIGKILLed while it rose ran out of memory.
pub fn oom_kills() -> Option<u64> {
    let vmstat = fs::read_to_string("/proc/vmstat").ok()?;
    vmstat
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
}

/// A cgroup that holds one runtime process tree and is removed with it.
pub struct RuntimeCgroup {
    dir: PathBuf,
    peak_file: &'static str,
    /// `cgroup.procs`, opened before fork so the child can join with one `write(2)`.
    joiner: Joiner,
}

impl RuntimeCgroup {
    /// Creates a cgroup named `name` under the bootstrap's own, on v2 if it has the memory
    /// controller, else on v1's memory hierarchy. `None` where neither can be had.
    pub fn create(name: &str) -> Option<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        let own = fs::read_to_string("/proc/self/cgroup").ok()?;
        let v2 = own_dir(
            &mountinfo,
            &own,
            |fstype, _| fstype == "cgroup2",
            |ctl| ctl.is_empty(),
        );
        if let Some(mut parent) = v2 {
            // Moved into its leaf by an earlier runtime's start: runtimes go beside it.
            if parent.ends_with(AGENT_LEAF) {
                parent.pop();
            }
            // Needed for `memory.peak` in the child (else v1 or VmHWM it is).
            let _ = enable_memory(&parent);
            if let Some(cg) = Self::make(&parent, name, "memory.peak") {
                return Some(cg);
            }
        }
        let v1 = own_dir(
            &mountinfo,
            &own,
            |fstype, opts| fstype == "cgroup" && opts.split(',').any(|o| o == "memory"),
            |ctl| ctl.split(',').any(|c| c == "memory"),
        )?;
        Self::make(&v1, name, "memory.max_usage_in_bytes")
    }

    fn make(parent: &Path, name: &str, peak_file: &'static str) -> Option<Self> {
        let dir = parent.join(name);
        cgroup::create(&dir).ok()?;
        match Joiner::open(&dir) {
            Ok(joiner) if dir.join(peak_file).is_file() => Some(RuntimeCgroup {
                dir,
                peak_file,
                joiner,
            }),
            _ => {
                let _ = cgroup::remove(&dir);
                None
            }
        }
    }

    /// What a child calls between fork and exec to join (see `runtime::spawn`).
    pub fn joiner(&self) -> Joiner {
        self.joiner.clone()
    }

    fn peak_bytes(&self) -> Option<u64> {
        cgroup::read_u64(&self.dir, self.peak_file).ok()
    }

    /// How many of its processes the kernel's OOM killer has ended, whether the cgroup's
    /// own limit or the whole machine's memory ran out: `oom_kill` in v2's
    /// `memory.events` or v1's `memory.oom_control` (Linux 4.13+).
    fn oom_kills(&self) -> Option<u64> {
        let file = match self.peak_file {
            "memory.peak" => "memory.events",
            _ => "memory.oom_control",
        };
        let counters = fs::read_to_string(self.dir.join(file)).ok()?;
        counters
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
    }

    /// Kills whatever of the tree is left (daemonised children), so the cgroup can go.
    pub async fn remove(&self) {
        for _ in 0..50 {
            let _ = cgroup::kill_procs(&self.dir);
            match cgroup::remove(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        say!("cgroup {} could not be removed", self.dir.display());
    }
}

/// Turns on the memory controller for the children of `parent`, the bootstrap's own
/// cgroup. cgroup2 lets a cgroup below the root that holds processes hand no controller
/// down: the bootstrap then moves into a leaf of its own first, as init does.
fn enable_memory(parent: &Path) -> kindling_plumbing::Result<()> {
    match cgroup::enable_controllers(parent, &["memory"]) {
        Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
            let leaf = parent.join(AGENT_LEAF);
            cgroup::create(&leaf)?;
            cgroup::write(&leaf, "cgroup.procs", "0")?;
            cgroup::enable_controllers(parent, &["memory"])
        }
        result => result,
    }
}

/// Where the bootstrap moves itself when its cgroup must give controllers to runtimes'.
const AGENT_LEAF: &str = "kindling-agent";

/// The directory of the bootstrap's own cgroup in the hierarchy whose mount matches
/// `is_mount` and whose `/proc/self/cgroup` line's controller list matches `is_line`.
fn own_dir(
    mountinfo: &str,
    own: &str,
    is_mount: impl Fn(&str, &str) -> bool,
    is_line: impl Fn(&str) -> bool,
) -> Option<PathBuf> {
    let path = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctl, path) = (parts.next()?, parts.next()?, parts.next()?);
        is_line(ctl).then_some(path)
    })?;
    mountinfo.lines().find_map(|l| {
        // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [TAGS...] - FSTYPE SOURCE SUPEROPTS`
        let (pre, post) = l.split_once(" - ")?;
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        let (root, mountpoint) = (*pre.get(3)?, *pre.get(4)?);
        if !is_mount(post.first()?, post.get(2).unwrap_or(&"")) {
            return None;
        }
        let rel = path.strip_prefix(root)?.trim_start_matches('/');
        Some(Path::new(mountpoint).join(rel))
    })
}

/// Where a runtime's peak memory is read from.
pub enum MemoryProbe {
    Cgroup(RuntimeCgroup),
    /// The runtime's pid, and the highest `VmHWM` seen so far, in bytes.
    ProcTree(u32, AtomicU64),
}

impl MemoryProbe {
    /// Whether the OOM killer has ended one of the runtime's processes, where its cgroup
    /// counts that: unlike `/proc/vmstat`, it does on a kernel built without VM event
    /// counters (the minimal microVM kernel). `None` where only [`oom_kills`] can tell.
    pub fn oom_killed(&self) -> Option<bool> {
        match self {
            MemoryProbe::Cgroup(cg) => cg.oom_kills().map(|kills| kills > 0),
            MemoryProbe::ProcTree(..) => None,
        }
    }

    /// Peak memory in MiB, rounded up.
    pub fn peak_mb(&self) -> u64 {
        let bytes = match self {
            MemoryProbe::Cgroup(cg) => cg.peak_bytes().unwrap_or(0),
            MemoryProbe::ProcTree(root, high) => {
                let now = tree_hwm(*root);
                high.fetch_max(now, Ordering::Relaxed).max(now)
            }
        };
        bytes.div_ceil(MIB)
    }
}

/// The largest `VmHWM` over `root` and its live descendants, in bytes. Read on every
/// invocation's result: the tree is walked from `root` through each thread's `children`
/// file (a few reads); a kernel without them gets a scan of all of `/proc`.
fn tree_hwm(root: u32) -> u64 {
    let mut scanned: Option<HashMap<u32, Vec<u32>>> = None;
    let mut stack = vec![root];
    let mut high = 0;
    while let Some(pid) = stack.pop() {
        high = high.max(vm_hwm(pid).unwrap_or(0));
        match children_of(pid) {
            Some(children) => stack.extend(children),
            None => {
                let all = scanned.get_or_insert_with(scan_children);
                stack.extend(all.get(&pid).into_iter().flatten());
            }
        }
    }
    high
}

/// The children of `pid`, from `/proc/PID/task/*/children`; `None` where the kernel has
/// no such files. A process gone meanwhile has none.
fn children_of(pid: u32) -> Option<Vec<u32>> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Some(Vec::new());
    };
    let mut children = Vec::new();
    for task in tasks.flatten() {
        match fs::read_to_string(task.path().join("children")) {
            Ok(list) => children.extend(
                list.split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && task.path().exists() => {
                return None
            }
            // The thread ended while we looked.
            Err(_) => {}
        }
    }
    Some(children)
}

/// Every process's children, from the parent field of each `/proc/PID/stat`.
fn scan_children() -> HashMap<u32, Vec<u32>> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for pid in entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        {
            if let Some(ppid) = fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parent_pid(&s))
            {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    children
}

/// The ppid field of `/proc/PID/stat`; the command name before it may hold spaces.
fn parent_pid(stat: &str) -> Option<u32> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn vm_hwm(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_own_cgroup_under_a_nested_mount_root() {
        let mountinfo = "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                         35 31 0:32 /ns /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory";
        let own = "4:memory:/ns/a/b\n0::/x";
        let v2 = own_dir(mountinfo, own, |t, _| t == "cgroup2", |c| c.is_empty());
        assert_eq!(v2.unwrap(), Path::new("/sys/fs/cgroup/unified/x"));
        let v1 = own_dir(
            mountinfo,
            own,
            |t, o| t == "cgroup" && o.split(',').any(|o| o == "memory"),
            |c| c == "memory",
        );
        assert_eq!(v1.unwrap(), Path::new("/sys/fs/cgroup/memory/a/b"));
    }

    #[test]
    fn parses_ppid_after_a_command_with_spaces() {
        assert_eq!(parent_pid("12 (a b) c) S 7 12 12 0"), Some(7));
    }

    #[test]
    fn own_tree_has_a_high_water_mark() {
        assert!(tree_hwm(std::process::id()) > 0);
    }

    /// The walk from the root finds the same children as the scan of `/proc`.
    #[test]
    fn children_are_found_from_the_root_as_by_the_scan() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep runs");
        let me = std::process::id();
        let walked = children_of(me);
        let scanned = scan_children().remove(&me).unwrap_or_default();
        let _ = child.kill();
        child.wait().expect("sleep is reaped");
        let walked = walked.expect("this kernel has /proc/PID/task/TID/children");
        assert!(walked.contains(&child.id()), "{walked:?}");
        assert!(scanned.contains(&child.id()), "{scanned:?}");
    }
}
