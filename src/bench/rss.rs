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
    /// The part of it that is guest RAM: the resident pages of mappings exactly the size
    /// of a guest's memory (kindling-vmm's private anonymous RAM, QEMU's memfd and the
    /// vsock daemon's view of it alike).
    pub guest_bytes: u64,
}

/// This process's descendants, summed per program (the executable's file name): the
/// hypervisors are children, or grandchildren behind kindling-jailer. Guest RAM is told
/// apart by its size, `guest_ram` bytes.
pub fn descendants_by_program(guest_ram: u64) -> anyhow::Result<BTreeMap<String, ProgramRss>> {
    let mut programs = BTreeMap::<String, ProgramRss>::new();
    for process in descendants()? {
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
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", process.pid));
        entry.guest_bytes += smaps.map_or(0, |smaps| rss_of_size(&smaps, guest_ram));
    }
    Ok(programs)
}

/// This process's descendants (a process may exit while we look: it is then left out).
pub fn descendants() -> anyhow::Result<Vec<Process>> {
    let me = Process::myself()?.pid;
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
    Ok(processes
        .into_iter()
        .filter(|(p, _)| descends_from_me(p.pid))
        .map(|(p, _)| p)
        .collect())
}

/// The resident bytes of the mappings in `smaps` (`/proc/PID/smaps`) that span exactly
/// `size` bytes.
pub fn rss_of_size(smaps: &str, size: u64) -> u64 {
    let mut counted = false;
    let mut total = 0;
    for line in smaps.lines() {
        let range = line
            .split_whitespace()
            .next()
            .and_then(|word| word.split_once('-'))
            .and_then(|(start, end)| {
                Some((
                    u64::from_str_radix(start, 16).ok()?,
                    u64::from_str_radix(end, 16).ok()?,
                ))
            });
        if let Some((start, end)) = range {
            counted = end.checked_sub(start) == Some(size);
        } else if let Some(kib) = line.strip_prefix("Rss:").filter(|_| counted) {
            let kib = kib.trim().trim_end_matches("kB").trim();
            total += kib.parse::<u64>().unwrap_or(0) * 1024;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_is_the_mappings_of_its_size() {
        let smaps = "\
7f0000000000-7f0008000000 rw-p 00000000 00:00 0\n\
Size:             131072 kB\n\
Rss:               40960 kB\n\
55d000000000-55d000001000 r-xp 00000000 08:01 42 /usr/bin/kindling-vmm\n\
Rss:                   4 kB\n\
7f1000000000-7f1008000000 rw-s 00000000 00:01 7 /memfd:mem (deleted)\n\
Rss:                1024 kB\n";
        assert_eq!(rss_of_size(smaps, 128 << 20), (40960 + 1024) << 10);
        assert_eq!(rss_of_size(smaps, 4096), 4 << 10);
        assert_eq!(rss_of_size(smaps, 1 << 30), 0);
    }

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
        let sleep_pid = nix::unistd::Pid::from_raw(line.trim().parse().expect("a pid"));
        // `$!` is known as soon as sh forks: wait for the child to be sleep, not sh.
        let exe = format!("/proc/{sleep_pid}/exe");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::fs::read_link(&exe).map_or(true, |exe| !exe.ends_with("sleep"))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let found = descendants_by_program(128 << 20);
        let _ = nix::sys::signal::kill(sleep_pid, nix::sys::signal::Signal::SIGKILL);
        child.wait().expect("sh is reaped");
        let sleep = found.unwrap()["sleep"];
        assert_eq!(sleep.processes, 1);
        assert!(sleep.bytes > 0, "{sleep:?}");
    }
}
