//! Resident memory of the hypervisor processes. The bench runs the server in-process, so
//! every hypervisor (and helper daemon) of a running microVM is a child of this process.

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

/// This process's children, summed per program (the executable's file name).
pub fn children_by_program() -> anyhow::Result<BTreeMap<String, ProgramRss>> {
    let me = Process::myself()?.pid;
    let mut programs = BTreeMap::<String, ProgramRss>::new();
    for process in all_processes().context("cannot list /proc")? {
        // A process may exit while we look: it is then no longer a running VM's.
        let Ok(process) = process else { continue };
        let Ok(stat) = process.stat() else { continue };
        if stat.ppid != me {
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

    #[test]
    fn a_child_is_found_with_its_resident_memory() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep runs");
        let found = children_by_program();
        child.kill().expect("sleep can be killed");
        child.wait().expect("sleep is reaped");
        let sleep = found.unwrap()["sleep"];
        assert_eq!(sleep.processes, 1);
        assert!(sleep.bytes > 0, "{sleep:?}");
    }
}
