//! Resident memory of the hypervisor processes. The bench runs the server in-process, so
//! every hypervisor (and helper daemon) of a running microVM descends from this process.

use std::collections::BTreeMap;

use anyhow::Context as _;
use procfs::process::{all_processes, Process};

/// Resident memory of one program's processes among this process's children.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgramRss {
    pub processes: usize,
    /// Sum of their `VmRSS`.
    pub bytes: u64,
    /// The part of it that is shared memory (`RssShmem`): for QEMU and its vhost-user
    /// daemon, mostly guest RAM (a shared memfd), which both map.
    pub shmem_bytes: u64,
}

/// This process's descendants, summed per program (the executable's file name): the
/// hypervisors are children, or grandchildren behind kindling-jailer.
pub fn descendants_by_program() -> anyhow::Result<BTreeMap<String, ProgramRss>> {
    let me = Process::myself()?.pid;
    // A process may exit while we look: it is then no longer a running VM's.
    let processes: Vec<(Process, i32)> = all_processes()
        .context("cannot list /proc")?
        .filter_map(|p| {
            let p = p.ok()?;
            let ppid = p.stat().ok()?.ppid;
            Some((p, ppid))
        })
        .collect();
    let parents: BTreeMap<i32, i32> = processes.iter().map(|(p, ppid)| (p.pid, *ppid)).collect();
    let descends_from_me = |mut pid: i32| {
        while let Some(&parent) = parents.get(&pid) {
            if parent == me {
                return true;
            }
            pid = parent;
        }
        false
    };
    let mut programs = BTreeMap::<String, ProgramRss>::new();
    for (process, _) in processes {
        if !descends_from_me(process.pid) {
            continue;
        }
        let (Ok(exe), Ok(status)) = (process.exe(), process.status()) else {
            continue;
        };
        let Some(name) = exe.file_name() else {
            continue;
        };
        let entry = programs
            .entry(name.to_string_lossy().into_owned())
            .or_default();
        entry.processes += 1;
        entry.bytes += status.vmrss.unwrap_or(0) * 1024;
        entry.shmem_bytes += status.rssshmem.unwrap_or(0) * 1024;
    }
    Ok(programs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grandchild counts too: kindling-vmm runs behind kindling-jailer.
    #[test]
    fn a_grandchild_is_found_with_its_resident_memory() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh runs");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
            &mut line,
        )
        .expect("sh names its sleep");
        let found = descendants_by_program();
        let sleep_pid = nix::unistd::Pid::from_raw(line.trim().parse().expect("a pid"));
        let _ = nix::sys::signal::kill(sleep_pid, nix::sys::signal::Signal::SIGKILL);
        child.wait().expect("sh is reaped");
        let sleep = found.unwrap()["sleep"];
        assert_eq!(sleep.processes, 1);
        assert!(sleep.bytes > 0, "{sleep:?}");
    }
}
