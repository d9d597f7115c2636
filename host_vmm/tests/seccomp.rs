//! kindling-vmm's per-thread seccomp filters, seen from outside: every thread of a running VMM
//! is filtered, and a system call outside a thread's allowlist ends the process with exit
//! status 148 and the call's number on stderr (Firecracker's behaviour).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{elf_kernel, kvm_or_skip, scratch, Client, KillOnDrop, DOTS_KERNEL};
use serde_json::{json, Value};

const VMM: &str = env!("CARGO_BIN_EXE_kindling-vmm");

/// A VMM started through the API with the printing guest on two vCPUs.
fn start_dots(extra: &[&str]) -> (KillOnDrop, PathBuf) {
    let sock = scratch("seccomp.sock");
    let kernel = scratch("dots");
    std::fs::write(&kernel, elf_kernel(DOTS_KERNEL)).unwrap();
    let child = KillOnDrop::new(
        Command::new(VMM)
            .arg("--api-sock")
            .arg(&sock)
            .args(["--serial-out", "none"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut api = Client::connect(&sock);
    for (path, body) in [
        ("/boot-source", json!({"kernel_image_path": kernel})),
        (
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 64}),
        ),
        ("/actions", json!({"action_type": "InstanceStart"})),
    ] {
        assert_eq!(api.call("PUT", path, Some(body)).0, 204, "PUT {path}");
    }
    (child, sock)
}

/// Each thread's name and `Seccomp:` mode (0 off, 2 filtered).
fn thread_modes(pid: u32) -> Vec<(String, u32)> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap()
                .trim()
                .to_string()
        };
        modes.push((field("Name:"), field("Seccomp:").parse().unwrap()));
    }
    modes.sort();
    modes
}

fn stop(child: KillOnDrop, sock: &Path) {
    drop(child);
    let _ = std::fs::remove_file(sock);
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered_unless_told_not_to() {
    if !kvm_or_skip() {
        return;
    }
    let (child, sock) = start_dots(&[]);
    // The main thread installs its filter just after the start: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let modes = loop {
        let modes = thread_modes(child.id());
        if modes.iter().all(|(_, mode)| *mode == 2) || Instant::now() > deadline {
            break modes;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // (KVM may add a kernel worker of its own to the process, `kvm-nx-lpage-re`.)
    for name in ["api", "kindling-vmm", "vcpu0", "vcpu1"] {
        assert!(modes.iter().any(|(n, _)| n == name), "{name}: {modes:?}");
    }
    assert!(modes.iter().all(|(_, mode)| *mode == 2), "{modes:?}");
    stop(child, &sock);

    let (child, sock) = start_dots(&["--no-seccomp"]);
    std::thread::sleep(Duration::from_millis(200));
    let modes = thread_modes(child.id());
    assert!(modes.iter().all(|(_, mode)| *mode == 0), "{modes:?}");
    stop(child, &sock);
}

#[test]
fn a_system_call_outside_the_allowlist_ends_the_vmm_with_148_and_names_it() {
    if !kvm_or_skip() {
        return;
    }
    // kindling-vmm's own filters, less `ioctl` for the vCPUs: their first `KVM_RUN` is then
    // a forbidden call (the handler itself needs `write`, which stays allowed).
    let own = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/seccomp/x86_64.json");
    let mut filters: Value = serde_json::from_str(&std::fs::read_to_string(own).unwrap()).unwrap();
    let vcpu = filters["vcpu"]["filter"].as_array_mut().unwrap();
    let before = vcpu.len();
    vcpu.retain(|rule| rule["syscall"] != "ioctl");
    assert!(vcpu.len() < before);
    let filter_file = scratch("filters.json");
    std::fs::write(&filter_file, filters.to_string()).unwrap();

    let kernel = scratch("dots");
    std::fs::write(&kernel, elf_kernel(DOTS_KERNEL)).unwrap();
    let config = scratch("config.json");
    let console = scratch("console");
    std::fs::write(
        &config,
        json!({"boot-source": {"kernel_image_path": kernel},
               "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}})
        .to_string(),
    )
    .unwrap();
    let out = Command::new(VMM)
        .args(["--no-api", "--config-file"])
        .arg(&config)
        .arg("--serial-out")
        .arg(&console)
        .arg("--seccomp-filter")
        .arg(&filter_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(148), "{stderr}");
    assert!(
        stderr.contains("seccomp: forbidden system call 16;"),
        "ioctl(2) is system call 16: {stderr}"
    );
    assert_eq!(std::fs::read(&console).unwrap(), b"", "the guest never ran");

    // A filter file that is not one is refused before anything starts.
    std::fs::write(&filter_file, r#"{"vmm": {}}"#).unwrap();
    let out = Command::new(VMM)
        .args(["--no-api", "--config-file"])
        .arg(&config)
        .arg("--seccomp-filter")
        .arg(&filter_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("seccomp"));
    for f in [filter_file, kernel, config, console] {
        let _ = std::fs::remove_file(f);
    }
}
