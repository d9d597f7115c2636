//! cgroup directories and their control files.
//!
//! A cgroup is a directory of a cgroup file system: `mkdir` creates one, `rmdir` removes
//! an empty one, and its settings and counters are small text files in it (`memory.max`,
//! `pids.max`, `cgroup.procs`, `cgroup.subtree_control`, `memory.peak`). Named for v2,
//! these helpers work on a v1 hierarchy's files too. They only name the files once and
//! give every failure its path; which limits to set, and what to do when a controller is
//! missing or a cgroup is still busy, stays with the caller.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{Error, Result};

/// Creates the cgroup `dir` under its existing parent; one that exists already is fine.
pub fn create(dir: &Path) -> Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(Error::new("creating cgroup", dir, e))
        }
        _ => Ok(()),
    }
}

/// Creates the cgroup `dir` and any missing ancestors (each one a cgroup too).
pub fn create_all(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::new("creating cgroup", dir, e))
}

/// Removes the cgroup `dir`, which must hold no processes and no child cgroups. The
/// kernel answers `EBUSY` for a moment after the last process died; `NotFound` when it is
/// gone already. Both are left to the caller to judge.
pub fn remove(dir: &Path) -> Result<()> {
    fs::remove_dir(dir).map_err(|e| Error::new("removing cgroup", dir, e))
}

/// The cgroups under `dir` and `dir` itself, every child before its parent: the order
/// in which [`remove`] can take them. Empty when `dir` does not exist.
pub fn removal_order(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut order = Vec::new();
    children_first(dir, &mut order)?;
    Ok(order)
}

fn children_first(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        entries => entries.map_err(|e| Error::new("listing", dir, e))?,
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::new("listing", dir, e))?;
        let is_dir = entry
            .file_type()
            .map_err(|e| Error::new("reading the type of", &entry.path(), e))?
            .is_dir();
        if is_dir {
            children_first(&entry.path(), out)?;
        }
    }
    out.push(dir.to_path_buf());
    Ok(())
}

/// Writes `value` to the control file `file` of the cgroup `dir` (`memory.max`, ...).
pub fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    let path = dir.join(file);
    fs::write(&path, value).map_err(|e| Error::new(format!("writing {value:?} to"), &path, e))
}

fn read(dir: &Path, file: &str) -> Result<String> {
    let path = dir.join(file);
    fs::read_to_string(&path).map_err(|e| Error::new("reading", &path, e))
}

/// Reads a counter such as `memory.peak` or `memory.current` of the cgroup `dir`.
/// A file holding `max` is not a number and reads as an `InvalidData` error.
pub fn read_u64(dir: &Path, file: &str) -> Result<u64> {
    let text = read(dir, file)?;
    text.trim().parse().map_err(|e| {
        let e = io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{:?}: {e}", text.trim()),
        );
        Error::new("reading", &dir.join(file), e)
    })
}

/// The controllers the cgroup `dir` can hand to its children (`cgroup.controllers`).
pub fn controllers(dir: &Path) -> Result<Vec<String>> {
    let text = read(dir, "cgroup.controllers")?;
    Ok(text.split_whitespace().map(str::to_string).collect())
}

/// Turns `controllers` on for the children of the cgroup `dir` (`+memory +pids` to its
/// `cgroup.subtree_control`). The kernel refuses with `EBUSY` below the root while `dir`
/// itself holds processes, and with `ENOENT` for a controller it does not offer there.
pub fn enable_controllers(dir: &Path, controllers: &[&str]) -> Result<()> {
    let enable: Vec<String> = controllers.iter().map(|c| format!("+{c}")).collect();
    write(dir, "cgroup.subtree_control", &enable.join(" "))
}

/// The processes in the cgroup `dir` itself (not in its children).
pub fn procs(dir: &Path) -> Result<Vec<Pid>> {
    let text = read(dir, "cgroup.procs")?;
    Ok(text
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .map(Pid::from_raw)
        .collect())
}

/// SIGKILLs every process in the cgroup `dir`; returns those it found. A process that
/// exits between the read and the kill is not an error. Children that a killed process
/// forks meanwhile are not in the list: callers repeat until it comes back empty.
pub fn kill_procs(dir: &Path) -> Result<Vec<Pid>> {
    let pids = procs(dir)?;
    for &pid in &pids {
        // ESRCH: it has exited already, which is what was wanted.
        let _ = kill(pid, Signal::SIGKILL);
    }
    Ok(pids)
}

/// A cgroup's `cgroup.procs`, opened before a fork so that the child can join between
/// fork and exec, where opening files or allocating is not safe. Cloning shares the file.
#[derive(Debug, Clone)]
pub struct Joiner(Arc<File>);

impl Joiner {
    /// Opens the `cgroup.procs` of the cgroup `dir` for writing.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("cgroup.procs");
        let file = File::options()
            .write(true)
            .open(&path)
            .map_err(|e| Error::new("opening", &path, e))?;
        Ok(Joiner(Arc::new(file)))
    }

    /// Moves the calling process into the cgroup. Async-signal-safe: a `write(2)` of `0`
    /// (the caller itself) to the open file, nothing else.
    pub fn join(&self) -> io::Result<()> {
        (&*self.0).write_all(b"0")
    }
}

/// The cgroup file systems mounted on this host, as `/proc/self/mounts` lists them: v2
/// hierarchies, and v1 hierarchies with the controllers each was mounted with. A hybrid
/// host holds its controllers in v1 hierarchies beside an empty v2 one, so which one holds
/// a limit is looked up, never assumed.
#[derive(Debug, Clone, Default)]
pub struct Hierarchies {
    v2: Vec<PathBuf>,
    /// `(mount point, mount options)`; the options name the controllers.
    v1: Vec<(PathBuf, String)>,
}

impl Hierarchies {
    /// This process's view, from `/proc/self/mounts`.
    pub fn read() -> Result<Self> {
        let path = Path::new("/proc/self/mounts");
        let table = fs::read_to_string(path).map_err(|e| Error::new("reading", path, e))?;
        Ok(Self::parse(&table))
    }

    /// The hierarchies listed in a `/proc/self/mounts` table.
    pub fn parse(table: &str) -> Self {
        let mut found = Hierarchies::default();
        for line in table.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let [_, point, fs_type, options, ..] = fields.as_slice() {
                let point = PathBuf::from(crate::mount_table::unescape(point));
                match *fs_type {
                    "cgroup2" => found.v2.push(point),
                    "cgroup" => found.v1.push((point, (*options).to_string())),
                    _ => {}
                }
            }
        }
        found
    }

    /// Every v2 mount point, in table order.
    pub fn v2(&self) -> impl Iterator<Item = &Path> {
        self.v2.iter().map(PathBuf::as_path)
    }

    /// The first v2 mount whose root offers every one of `controllers`.
    pub fn v2_offering(&self, wanted: &[&str]) -> Option<&Path> {
        self.v2().find(|root| {
            controllers(root)
                .is_ok_and(|offered| wanted.iter().all(|w| offered.iter().any(|o| o == w)))
        })
    }

    /// The v1 hierarchy mounted with `controller`.
    pub fn v1(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(_, options)| options.split(',').any(|o| o == controller))
            .map(|(point, _)| point.as_path())
    }

    /// Every mount point, v2 first.
    pub fn all(&self) -> impl Iterator<Item = &Path> {
        self.v2()
            .chain(self.v1.iter().map(|(point, _)| point.as_path()))
    }

    /// Removes the cgroup `path` (below each mount point), and the cgroups made inside it,
    /// from every hierarchy that has it: what a dead server's environment left behind.
    /// Processes still in any of them are SIGKILLed and given [`LEFTOVER_PATIENCE`] to
    /// exit; past it the cgroups stay (an `EBUSY` error says so) until a later call finds
    /// them empty.
    pub fn remove_leftover(&self, path: &Path) -> Result<()> {
        for root in self.all() {
            let dir = root.join(path);
            if !dir.is_dir() {
                continue;
            }
            let order = removal_order(&dir)?;
            let deadline = std::time::Instant::now() + LEFTOVER_PATIENCE;
            // A pass that finds no process anywhere ends it; one a dying process forked
            // meanwhile is killed by the next pass.
            while kill_all(&order)? {
                if std::time::Instant::now() >= deadline {
                    let busy = io::Error::from_raw_os_error(nix::libc::EBUSY);
                    return Err(Error::new("killed the processes left in", &dir, busy));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            for dir in order {
                remove(&dir)?;
            }
        }
        Ok(())
    }
}

/// How long SIGKILLed processes of a leftover cgroup get to leave it: they exit at once
/// unless in an uninterruptible sleep.
pub const LEFTOVER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// SIGKILLs the processes of every cgroup in `dirs`; whether there were any.
fn kill_all(dirs: &[PathBuf]) -> Result<bool> {
    let mut found = false;
    for dir in dirs {
        found |= !kill_procs(dir)?.is_empty();
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command};

    use super::*;

    /// A plain directory standing in for a cgroup: right for the file formats and the
    /// order of things, not for what the kernel does on a write.
    fn fake() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn control_files_are_written_and_read_in_the_kernels_formats() {
        let cg = fake();
        write(cg.path(), "pids.max", "64").unwrap();
        assert_eq!(
            fs::read_to_string(cg.path().join("pids.max")).unwrap(),
            "64"
        );

        fs::write(cg.path().join("memory.peak"), "1048576\n").unwrap();
        assert_eq!(read_u64(cg.path(), "memory.peak").unwrap(), 1_048_576);
        fs::write(cg.path().join("memory.max"), "max\n").unwrap();
        let e = read_u64(cg.path(), "memory.max").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("\"max\""), "{e}");
        let e = read_u64(cg.path(), "memory.current").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("memory.current"), "{e}");

        fs::write(cg.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        assert_eq!(controllers(cg.path()).unwrap(), ["cpu", "memory", "pids"]);
        enable_controllers(cg.path(), &["memory", "pids"]).unwrap();
        let enabled = fs::read_to_string(cg.path().join("cgroup.subtree_control")).unwrap();
        assert_eq!(enabled, "+memory +pids");

        fs::write(cg.path().join("cgroup.procs"), "12\n345\n").unwrap();
        assert_eq!(
            procs(cg.path()).unwrap(),
            [Pid::from_raw(12), Pid::from_raw(345)]
        );
    }

    #[test]
    fn creation_accepts_an_existing_cgroup_but_wants_its_parent() {
        let root = fake();
        let cg = root.path().join("a");
        create(&cg).unwrap();
        create(&cg).unwrap();
        let deep = root.path().join("b/c");
        let e = create(&deep).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        create_all(&deep).unwrap();
        assert!(deep.is_dir());
    }

    #[test]
    fn removal_order_puts_every_child_before_its_parent() {
        let root = fake();
        let top = root.path().join("sandbox");
        for dir in ["sandbox/init", "sandbox/workload/a", "sandbox/workload/b"] {
            fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        // Control files are not cgroups.
        fs::write(top.join("cgroup.procs"), "").unwrap();
        let order = removal_order(&top).unwrap();
        assert_eq!(order.len(), 5, "{order:?}");
        assert_eq!(order.last(), Some(&top));
        for (i, dir) in order.iter().enumerate() {
            assert!(
                order[i + 1..].iter().all(|later| !later.starts_with(dir)),
                "{} comes before one of its children in {order:?}",
                dir.display()
            );
        }
        // On a cgroup fs the control files go with the directory; here they must go first.
        fs::remove_file(top.join("cgroup.procs")).unwrap();
        for dir in &order {
            remove(dir).unwrap();
        }
        assert!(removal_order(&top).unwrap().is_empty());
        assert_eq!(remove(&top).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    /// The first cgroup2 mount, where this test may make cgroups (root only).
    fn real_cgroup2() -> Option<PathBuf> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
        mounts.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
    }

    /// A `sleep` started inside the cgroup of `joiner`, joined between fork and exec.
    fn sleeper(joiner: &Joiner) -> Child {
        let joiner = joiner.clone();
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        // SAFETY: the hook runs between fork and exec and only calls `Joiner::join`, one
        // write(2) to a file opened before the fork: async-signal-safe, no allocation.
        unsafe { cmd.pre_exec(move || joiner.join()) };
        cmd.spawn().unwrap()
    }

    #[test]
    fn a_real_cgroup_is_joined_killed_and_removed() {
        let Some(root) = real_cgroup2() else {
            println!("SKIPPED: needs root and a cgroup2 mount");
            return;
        };
        let parent = root.join(format!("kindling-plumbing-test-{}", std::process::id()));
        let cg = parent.join("child");
        create_all(&cg).unwrap();
        assert!(controllers(&cg).is_ok());

        let joiner = Joiner::open(&cg).unwrap();
        let mut child = sleeper(&joiner);
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
        assert_eq!(procs(&cg).unwrap(), [pid]);
        // A cgroup with a process in it cannot go.
        assert_eq!(
            remove(&cg).unwrap_err().raw_os_error(),
            Some(nix::libc::EBUSY)
        );

        assert_eq!(kill_procs(&cg).unwrap(), [pid]);
        assert!(!child.wait().unwrap().success());
        assert!(procs(&cg).unwrap().is_empty());

        let order = removal_order(&parent).unwrap();
        assert_eq!(order, [cg.clone(), parent.clone()]);
        for dir in &order {
            remove(dir).unwrap();
        }
        assert!(!parent.exists());
    }

    #[test]
    fn a_leftover_tree_with_processes_is_killed_and_removed_in_one_call() {
        let Some(root) = real_cgroup2() else {
            println!("SKIPPED: needs root and a cgroup2 mount");
            return;
        };
        let name = format!("kindling-plumbing-test-{}-leftover", std::process::id());
        let top = root.join(&name);
        let inner = top.join("workload/function");
        create_all(&inner).unwrap();
        let mut sleepers = [
            sleeper(&Joiner::open(&top).unwrap()),
            sleeper(&Joiner::open(&inner).unwrap()),
        ];
        let table = format!("cgroup2 {} cgroup2 rw 0 0\n", root.display());
        Hierarchies::parse(&table)
            .remove_leftover(Path::new(&name))
            .unwrap();
        assert!(!top.exists(), "{} is still there", top.display());
        for child in &mut sleepers {
            assert!(!child.wait().unwrap().success());
        }
    }

    #[test]
    fn a_real_cgroup_refuses_a_controller_it_does_not_have() {
        let Some(root) = real_cgroup2() else {
            println!("SKIPPED: needs root and a cgroup2 mount");
            return;
        };
        let cg = root.join(format!("kindling-plumbing-test-{}-ctl", std::process::id()));
        create(&cg).unwrap();
        let result = enable_controllers(&cg, &["no-such-controller"]);
        remove(&cg).unwrap();
        let e = result.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::EINVAL), "{e}");
        assert!(e.to_string().contains("cgroup.subtree_control"), "{e}");
    }

    /// A place for a cgroup with the memory controller, and its limit and peak files:
    /// below a cgroup2 mount whose root hands memory down, else in v1's memory hierarchy.
    fn real_memory_hierarchy() -> Option<(PathBuf, &'static str, &'static str)> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
        let mounts: Vec<Vec<&str>> = mounts.lines().map(|l| l.split(' ').collect()).collect();
        let v2 = mounts.iter().find_map(|f| {
            let dir = PathBuf::from(f.get(1)?);
            let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).ok()?;
            (f.get(2) == Some(&"cgroup2") && enabled.split_whitespace().any(|c| c == "memory"))
                .then_some((dir, "memory.max", "memory.peak"))
        });
        v2.or_else(|| {
            mounts.iter().find_map(|f| {
                let memory = f.get(3)?.split(',').any(|o| o == "memory");
                (f.get(2) == Some(&"cgroup") && memory).then(|| {
                    let dir = PathBuf::from(f[1]);
                    (dir, "memory.limit_in_bytes", "memory.max_usage_in_bytes")
                })
            })
        })
    }

    #[test]
    fn a_real_cgroup_takes_a_memory_limit_and_counts_its_peak() {
        let Some((root, limit, peak)) = real_memory_hierarchy() else {
            println!("SKIPPED: needs root and a hierarchy with the memory controller");
            return;
        };
        let cg = root.join(format!("kindling-plumbing-test-{}-mem", std::process::id()));
        create(&cg).unwrap();
        write(&cg, limit, "67108864").unwrap();
        assert_eq!(read_u64(&cg, limit).unwrap(), 64 << 20);
        let mut child = sleeper(&Joiner::open(&cg).unwrap());
        let counted = read_u64(&cg, peak);
        kill_procs(&cg).unwrap();
        child.wait().unwrap();
        remove(&cg).unwrap();
        assert!(counted.unwrap() > 0, "{} counted nothing", cg.display());
    }

    const HYBRID: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/net_cls\\040x cgroup rw,net_cls 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn finds_v1_hierarchies_by_controller() {
        let found = Hierarchies::parse(HYBRID);
        assert_eq!(found.v1("memory"), Some(Path::new("/sys/fs/cgroup/memory")));
        assert_eq!(found.v1("pids"), Some(Path::new("/sys/fs/cgroup/pids")));
        assert_eq!(
            found.v1("net_cls"),
            Some(Path::new("/sys/fs/cgroup/net_cls x"))
        );
        assert_eq!(found.v1("cpu"), None);
        let v2: Vec<_> = found.v2().collect();
        assert_eq!(v2, [Path::new("/sys/fs/cgroup/unified")]);
        assert_eq!(found.all().count(), 4);
    }
}
