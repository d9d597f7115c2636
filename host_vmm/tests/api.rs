//! The Firecracker-compatible API on a real Unix socket, driven like a Firecracker client:
//! configure, start, inspect; bad requests get 400 with a fault message and change nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    api_vmm, elf_kernel, kvm_or_skip, scratch, Client, KillOnDrop, DOTS_KERNEL, HELLO_KERNEL,
    KEYBOARD_KERNEL, SPIN_KERNEL,
};
use serde_json::{json, Value};

fn fault(resp: &(u16, Option<Value>)) -> String {
    assert_eq!(resp.0, 400, "{resp:?}");
    resp.1.as_ref().unwrap()["fault_message"]
        .as_str()
        .unwrap()
        .to_string()
}

fn spawn(sock: &Path) -> KillOnDrop {
    KillOnDrop::new(
        Command::new(env!("CARGO_BIN_EXE_kindling-vmm"))
            .arg("--api-sock")
            .arg(sock)
            .args(["--timings"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn kernel(code: &[u8]) -> PathBuf {
    let path = scratch("vmlinux");
    std::fs::write(&path, elf_kernel(code)).unwrap();
    path
}

/// Waits up to 5 s for `file` to grow past `size` bytes.
fn grows_past(file: &Path, size: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if std::fs::metadata(file).map_or(0, |m| m.len()) > size {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn pause_parks_every_vcpu_and_resume_lets_the_guest_run_on() {
    if !kvm_or_skip() {
        return;
    }
    let sock = scratch("pause.sock");
    let console = scratch("pause-console");
    let kernel = kernel(DOTS_KERNEL);
    let mut child = KillOnDrop::new(api_vmm(&sock, &console).spawn().unwrap());
    let mut c = Client::connect(&sock);
    assert!(
        fault(&c.call("PATCH", "/vm", Some(json!({"state": "Paused"}))))
            .contains("before starting")
    );
    assert!(
        fault(&c.call("PATCH", "/vm", Some(json!({"state": "Frozen"}))))
            .contains("unknown variant")
    );
    for (path, body) in [
        ("/boot-source", json!({"kernel_image_path": kernel})),
        (
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 64}),
        ),
        ("/actions", json!({"action_type": "InstanceStart"})),
    ] {
        assert_eq!(c.call("PUT", path, Some(body)).0, 204, "PUT {path}");
    }
    let size = || std::fs::metadata(&console).map_or(0, |m| m.len());
    assert!(grows_past(&console, 0), "the guest never printed");

    for _ in 0..3 {
        assert_eq!(
            c.call("PATCH", "/vm", Some(json!({"state": "Paused"}))).0,
            204
        );
        assert_eq!(c.call("GET", "/", None).1.unwrap()["state"], "Paused");
        // Parked means out of KVM_RUN: not one more byte, however long we wait.
        let paused_at = size();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(size(), paused_at, "the guest printed while paused");

        assert_eq!(
            c.call("PATCH", "/vm", Some(json!({"state": "Resumed"}))).0,
            204
        );
        assert_eq!(c.call("GET", "/", None).1.unwrap()["state"], "Running");
        assert!(grows_past(&console, paused_at), "the guest did not run on");
    }
    // A paused VM still stops on SIGTERM (this guest has no keyboard driver to ask first).
    assert_eq!(
        c.call("PATCH", "/vm", Some(json!({"state": "Paused"}))).0,
        204
    );
    child.sigterm();
    let status = child.exit_within(Duration::from_secs(10), "a paused VM ignored SIGTERM");
    assert_eq!(status.code(), Some(5), "exit code 5: stopped by the VMM");
    assert!(!sock.exists(), "the API socket is removed at exit");
    let _ = std::fs::remove_file(console);
}

#[test]
fn sigterm_resumes_a_paused_guest_so_that_it_shuts_down_cleanly() {
    if !kvm_or_skip() {
        return;
    }
    use std::io::BufRead;
    let sock = scratch("paused-term.sock");
    let kernel = kernel(KEYBOARD_KERNEL);
    let mut child = spawn(&sock);
    let mut c = Client::connect(&sock);
    for (path, body) in [
        ("/boot-source", json!({"kernel_image_path": kernel})),
        ("/actions", json!({"action_type": "InstanceStart"})),
    ] {
        assert_eq!(c.call("PUT", path, Some(body)).0, 204, "PUT {path}");
    }
    // `r`: its keyboard driver listens.
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "r\n");
    assert_eq!(
        c.call("PATCH", "/vm", Some(json!({"state": "Paused"}))).0,
        204
    );
    child.sigterm();
    let status = child.exit_within(Duration::from_secs(10), "the paused guest never shut down");
    assert_eq!(status.code(), Some(0), "exit 0: the guest reset itself");
}

#[test]
fn a_firecracker_style_session_boots_the_vm() {
    if !kvm_or_skip() {
        return;
    }
    let sock = scratch("api.sock");
    let kernel = kernel(HELLO_KERNEL);
    let disk = scratch("disk");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let uds = scratch("v.sock");
    let child = spawn(&sock);
    let mut c = Client::connect(&sock);

    let (code, info) = c.call("GET", "/", None);
    assert_eq!(code, 200);
    assert_eq!(info.unwrap()["state"], "Not started");
    assert_eq!(c.call("GET", "/version", None).0, 200);

    // Bad requests change nothing.
    assert!(fault(&c.call(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 0, "mem_size_mib": 64}))
    ))
    .contains("vcpu_count"));
    assert!(fault(&c.call(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 1, "mem_size_mib": 64, "foo": 1}))
    ))
    .contains("unknown field"));
    assert!(fault(&c.call(
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": "/nonexistent"}))
    ))
    .contains("kernel_image_path"));
    assert!(fault(&c.call(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"}))
    ))
    .contains("boot-source is required"));
    assert!(fault(&c.call("GET", "/balloon", None)).contains("Invalid request method and/or path"));
    let (code, mc) = c.call("GET", "/machine-config", None);
    assert_eq!((code, mc.unwrap()["vcpu_count"].clone()), (200, json!(1)));

    assert_eq!(
        c.call(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 1, "mem_size_mib": 64}))
        )
        .0,
        204
    );
    assert_eq!(
        c.call("GET", "/machine-config", None).1.unwrap()["mem_size_mib"],
        64
    );
    assert_eq!(
        c.call(
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0 reboot=k"}))
        )
        .0,
        204
    );
    let drive = json!({"drive_id": "rootfs", "path_on_host": disk, "is_root_device": true, "is_read_only": true});
    assert_eq!(c.call("PUT", "/drives/rootfs", Some(drive)).0, 204);
    let second_root = json!({"drive_id": "other", "path_on_host": disk, "is_root_device": true});
    assert!(fault(&c.call("PUT", "/drives/other", Some(second_root)))
        .contains("root block device already exists"));
    assert_eq!(
        c.call(
            "PUT",
            "/vsock",
            Some(json!({"guest_cid": 3, "uds_path": uds}))
        )
        .0,
        204
    );
    assert_eq!(
        c.call(
            "PUT",
            "/actions",
            Some(json!({"action_type": "InstanceStart"}))
        )
        .0,
        204
    );

    let out = child.wait_with_output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    assert!(stderr.contains("process_start_to_api_ready_us"), "{stderr}");
    assert!(
        !sock.exists() && !uds.exists(),
        "sockets are unlinked on exit"
    );
    for p in [kernel, disk] {
        std::fs::remove_file(p).unwrap();
    }
}

#[test]
fn after_start_configuration_and_a_second_start_are_refused() {
    if !kvm_or_skip() {
        return;
    }
    let sock = scratch("api.sock");
    let kernel = kernel(SPIN_KERNEL);
    let child = spawn(&sock);
    let mut c = Client::connect(&sock);
    assert_eq!(
        c.call(
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": kernel}))
        )
        .0,
        204
    );
    assert_eq!(
        c.call(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 1, "mem_size_mib": 32}))
        )
        .0,
        204
    );
    assert_eq!(
        c.call(
            "PUT",
            "/actions",
            Some(json!({"action_type": "InstanceStart"}))
        )
        .0,
        204
    );
    assert_eq!(c.call("GET", "/", None).1.unwrap()["state"], "Running");
    assert!(fault(&c.call(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"}))
    ))
    .contains("after starting"));
    assert!(fault(&c.call(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 2, "mem_size_mib": 32}))
    ))
    .contains("after starting"));
    assert_eq!(
        c.call("GET", "/machine-config", None).1.unwrap()["vcpu_count"],
        1
    );

    child.sigterm();
    let out = child.wait_with_output();
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!sock.exists());
    std::fs::remove_file(kernel).unwrap();
}

#[test]
fn sigterm_before_start_exits_and_removes_the_socket() {
    let sock = scratch("api.sock");
    let child = spawn(&sock);
    let _ = Client::connect(&sock);
    child.sigterm();
    let out = child.wait_with_output();
    assert_eq!(out.status.code(), Some(5));
    assert!(!sock.exists());
}

#[test]
fn send_ctrl_alt_del_shuts_a_listening_guest_down() {
    if !kvm_or_skip() {
        return;
    }
    use std::io::BufRead;
    let sock = scratch("api.sock");
    let kernel = kernel(KEYBOARD_KERNEL);
    let mut child = spawn(&sock);
    let mut c = Client::connect(&sock);
    assert_eq!(
        c.call(
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": kernel}))
        )
        .0,
        204
    );
    assert_eq!(
        c.call(
            "PUT",
            "/actions",
            Some(json!({"action_type": "InstanceStart"}))
        )
        .0,
        204
    );
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "r\n");
    assert_eq!(
        c.call(
            "PUT",
            "/actions",
            Some(json!({"action_type": "SendCtrlAltDel"}))
        )
        .0,
        204
    );
    let out = child.wait_with_output();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(kernel).unwrap();
}

#[test]
fn a_config_file_boots_the_vm_and_the_api_controls_it() {
    if !kvm_or_skip() {
        return;
    }
    let sock = scratch("file-api.sock");
    let console = scratch("file-api-console");
    let config = scratch("file-api.json");
    let kernel = kernel(DOTS_KERNEL);
    let json = json!({"boot-source": {"kernel_image_path": kernel},
                      "machine-config": {"vcpu_count": 1, "mem_size_mib": 32}});
    std::fs::write(&config, json.to_string()).unwrap();
    let mut child = KillOnDrop::new(
        api_vmm(&sock, &console)
            .arg("--config-file")
            .arg(&config)
            .spawn()
            .unwrap(),
    );
    let mut c = Client::connect(&sock);
    assert_eq!(c.call("GET", "/", None).1.unwrap()["state"], "Running");
    assert_eq!(
        c.call("GET", "/machine-config", None).1.unwrap()["mem_size_mib"],
        32,
        "the API shows the file's configuration"
    );
    assert!(fault(&c.call(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"}))
    ))
    .contains("after starting"));
    assert!(grows_past(&console, 0), "the guest never printed");
    assert_eq!(
        c.call("PATCH", "/vm", Some(json!({"state": "Paused"}))).0,
        204
    );
    assert_eq!(c.call("GET", "/", None).1.unwrap()["state"], "Paused");
    child.sigterm();
    let status = child.exit_within(Duration::from_secs(10), "the VMM ignored SIGTERM");
    assert_eq!(status.code(), Some(5));
    assert!(!sock.exists(), "the API socket is removed at exit");
    for f in [console, config, kernel] {
        let _ = std::fs::remove_file(f);
    }
}
