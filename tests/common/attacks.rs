//! What the probe function's `attacks` action must report in every isolation: each way out
//! of its environment (`tests/vm-functions/probe/app.py`) failed, and with the errno a user
//! would expect — most with the seccomp denylist's EPERM.

use nix::errno::Errno::{self, EACCES, ECONNREFUSED, ENETUNREACH, ENOENT, EPERM, EROFS};
use serde_json::{Map, Value};

/// Calls the seccomp denylist refuses (or, without it, the missing capability).
const REFUSED: [&str; 19] = [
    "remount /var/task rw",
    "remount /var/runtime rw",
    "remount /usr rw",
    "remount / rw",
    "mount cgroup v1",
    "mount proc",
    "mount tmpfs",
    "unshare mount ns",
    "init_module",
    "kexec_load",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "open_by_handle_at",
    "reboot",
    "mknod block device",
    "setuid 0",
    "chroot",
];

/// Checks the table of attacks and their errnos (0: it succeeded). `host_link` is what
/// reaching past the agent to the host's Runtime API fails with (a sandbox's Unix socket is
/// the agent's: EACCES; a microVM's vsock sockets are the filter's: EPERM), `host_ports`
/// the host's loopback ports the probe tried. The error names the attacks that differ.
pub fn check_attacks(
    attacks: &Map<String, Value>,
    host_link: Errno,
    host_ports: &[u16],
) -> Result<(), String> {
    let errno_of = |attack: &str| {
        let raw = attacks.get(attack).and_then(Value::as_i64).unwrap_or(-1);
        Errno::from_raw(i32::try_from(raw).unwrap_or(-1))
    };
    let mut expected: Vec<(String, Vec<Errno>)> = REFUSED
        .iter()
        .map(|attack| (attack.to_string(), vec![EPERM]))
        .collect();
    for path in ["/var/task", "/var/runtime", "/usr", "/"] {
        expected.push((format!("write into {path}"), vec![EROFS, EACCES]));
    }
    for path in [
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/kernel/modprobe",
        "/proc/sys/vm/overcommit_memory",
        "/sys/kernel/uevent_helper",
    ] {
        // (A kernel without modules or hotplug helpers has no file to write.)
        expected.push((format!("write {path}"), vec![EROFS, EACCES, ENOENT]));
    }
    // The processes it does not own (init and the agent): no trace, no signal, no peek;
    // and no cgroup file (found by walking /sys/fs/cgroup) writable.
    for attack in attacks.keys() {
        if attack.starts_with("kill ")
            || attack.starts_with("ptrace ")
            || attack.ends_with("'s environ")
        {
            expected.push((attack.clone(), vec![EPERM, EACCES]));
        } else if attack.starts_with("write /sys/fs/cgroup") {
            expected.push((attack.clone(), vec![EACCES, EROFS, EPERM]));
        }
    }
    let others = attacks.keys().filter(|a| a.starts_with("kill ")).count();
    if others < 2 {
        return Err(format!("init and the agent were not attacked: {attacks:?}"));
    }
    expected.push(("open the host's file".into(), vec![ENOENT]));
    expected.push(("open it through /proc/1/root".into(), vec![ENOENT, EACCES]));
    expected.push(("connect to the host's Runtime API".into(), vec![host_link]));
    for port in host_ports {
        expected.push((
            format!("connect to 127.0.0.1:{port}"),
            vec![ENETUNREACH, ECONNREFUSED],
        ));
    }
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(attack, allowed)| !allowed.contains(&errno_of(attack)))
        .map(|(attack, allowed)| format!("{attack}: {} (expected {allowed:?})", errno_of(attack)))
        .collect();
    let succeeded: Vec<&String> = attacks
        .iter()
        .filter(|(_, errno)| errno.as_i64() == Some(0))
        .map(|(attack, _)| attack)
        .collect();
    match (wrong.is_empty(), succeeded.is_empty()) {
        (true, true) => Ok(()),
        _ => Err(format!(
            "attacks that succeeded: {succeeded:?}; with another errno: {wrong:#?}"
        )),
    }
}
