//! Peak memory of the runtime's process tree.
//!
//! Preferred: a cgroup created for each runtime start, whose kernel-kept peak counts every
//! process of the tree, even those that already exited (v2 `memory.peak`, or v1
//! `memory.max_usage_in_bytes` where the memory controller is only on v1). Where no cgroup
//! can be created (the sandbox), the highest `VmHWM` over the live tree, remembered across
//! reads. That is read on every invocation's result, on the caller's path: the runtime's
//! own files are kept open between reads ([`ProcTree`]), so a read is a few `pread`s, not
//! two dozen opens, reads and closes.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use nix::dir::Dir;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

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
    ProcTree(ProcTree),
}

/// The runtime's process tree in `/proc`, and the highest `VmHWM` seen in it so far.
pub struct ProcTree {
    root: u32,
    high: AtomicU64,
    /// The root's files, opened at the first read; `None` after it failed (the runtime is
    /// gone, or the kernel lacks them): then every read walks the tree by path.
    kept: Mutex<Option<RootFiles>>,
}

/// The files of the runtime's process that every read looks at, kept open: a `pread` at
/// offset 0 makes procfs generate a file anew, and answers with as much of it as fits.
struct RootFiles {
    status: File,
    tasks: Dir,
    /// Each thread's `children`, by thread id; threads that ended are dropped.
    children: HashMap<u32, File>,
    /// Read into, and reused from one read to the next.
    buf: Vec<u8>,
}

/// The first size tried for a `/proc` file (`status` is about 1.5 KiB).
const PROC_READ: usize = 4096;

/// The whole of `file` by `pread`s from offset 0 into `buf`, grown until a read leaves
/// room (procfs fills what it is offered up to the end of the file).
fn pread_whole<'a>(file: &File, buf: &'a mut Vec<u8>) -> io::Result<&'a [u8]> {
    if buf.len() < PROC_READ {
        buf.resize(PROC_READ, 0);
    }
    loop {
        let n = file.read_at(buf, 0)?;
        if n < buf.len() {
            return Ok(&buf[..n]);
        }
        let grown = buf.len() * 2;
        buf.resize(grown, 0);
    }
}

impl RootFiles {
    fn open(root: u32) -> io::Result<Self> {
        let tasks = Dir::open(
            format!("/proc/{root}/task").as_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(RootFiles {
            status: File::open(format!("/proc/{root}/status"))?,
            tasks,
            children: HashMap::new(),
            buf: Vec::new(),
        })
    }

    /// The root's `VmHWM` and its children, or an error once it is gone.
    fn read(&mut self, root: u32) -> io::Result<(u64, Vec<u32>)> {
        let hwm = parse_vm_hwm(pread_whole(&self.status, &mut self.buf)?).unwrap_or(0);
        let mut threads = Vec::new();
        for entry in self.tasks.iter() {
            let entry = entry?;
            if let Some(tid) = entry.file_name().to_str().ok().and_then(|n| n.parse().ok()) {
                threads.push(tid);
            }
        }
        self.children.retain(|tid, _| threads.contains(tid));
        let mut children = Vec::new();
        for tid in threads {
            let file = match self.children.entry(tid) {
                Entry::Occupied(kept) => kept.into_mut(),
                Entry::Vacant(slot) => {
                    match File::open(format!("/proc/{root}/task/{tid}/children")) {
                        Ok(file) => slot.insert(file),
                        // The thread ended since the listing, or the kernel has no such
                        // files: then the caller walks by path, and scans all of `/proc`.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            if Path::new(&format!("/proc/{root}/task/{tid}")).exists() {
                                return Err(e);
                            }
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            // A thread that ended since the listing has no children left.
            if let Ok(list) = pread_whole(file, &mut self.buf) {
                children.extend(
                    String::from_utf8_lossy(list)
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        Ok((hwm, children))
    }
}

impl ProcTree {
    pub fn new(root: u32) -> Self {
        ProcTree {
            root,
            high: AtomicU64::new(0),
            kept: Mutex::new(None),
        }
    }

    /// The highest `VmHWM` over the tree so far, in bytes.
    fn peak_bytes(&self) -> u64 {
        let now = self.hwm_now();
        self.high.fetch_max(now, Ordering::Relaxed).max(now)
    }

    /// The largest `VmHWM` over the live tree now: the root and its children through the
    /// kept files, their descendants by path; by path throughout where they cannot be kept.
    fn hwm_now(&self) -> u64 {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.is_none() {
            *kept = RootFiles::open(self.root).ok();
        }
        let read = kept.as_mut().map(|files| files.read(self.root));
        match read {
            Some(Ok((root_hwm, children))) => {
                children.into_iter().map(tree_hwm).fold(root_hwm, u64::max)
            }
            Some(Err(_)) | None => {
                *kept = None;
                tree_hwm(self.root)
            }
        }
    }
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
            MemoryProbe::ProcTree(tree) => tree.peak_bytes(),
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
    parse_vm_hwm(&fs::read(format!("/proc/{pid}/status")).ok()?)
}

/// `VmHWM` of a `/proc/PID/status`, in bytes.
fn parse_vm_hwm(status: &[u8]) -> Option<u64> {
    let line = status
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"VmHWM:"))?;
    let kb: u64 = std::str::from_utf8(line)
        .ok()?
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

    /// The kept files answer read after read, as the tree changes: a child started
    /// between two reads is found by the second.
    #[test]
    fn kept_files_see_the_tree_change_between_reads() {
        let me = std::process::id();
        let tree = ProcTree::new(me);
        assert!(tree.peak_bytes() > 0);
        let mut files = RootFiles::open(me).expect("own /proc files open");
        let (hwm, before) = files.read(me).expect("own /proc files read");
        assert!(hwm > 0);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep runs");
        let (_, after) = files.read(me).expect("own /proc files read again");
        let _ = child.kill();
        child.wait().expect("sleep is reaped");
        assert!(!before.contains(&child.id()), "{before:?}");
        assert!(after.contains(&child.id()), "{after:?}");
        assert_eq!(
            parse_vm_hwm(b"Name:\tx\nVmHWM:\t   1234 kB\n"),
            Some(1234 * 1024)
        );
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
