//! Linux booted by the static kindling-vmm through kindling-jailer, as the microVM
//! environment starts it: only the kernel, initramfs, root drive, config and a socket
//! folder in the chroot, an unprivileged uid. The guest's init switches to the root drive
//! (read through the jail's bind mount), its bootstrap reaches the host's socket over
//! vsock, and SIGTERM to the jailer shuts the guest down cleanly.
//!
//! It needs a KVM that boots Linux: on this project's machines it re-runs itself inside the
//! nested-KVM harness (`kindling-nested-kvm`), where `/` is an initramfs and the jailer
//! takes its move-and-chroot path instead of pivot_root.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kindling_nested_kvm::{LinuxGuest, NestedTest};

const JAILER: &str = env!("CARGO_BIN_EXE_kindling-jailer");
/// Names the static kindling-vmm inside the harness.
const VMM_ENV: &str = "KINDLING_JAILED_VMM";
const UID: u32 = 900_123;
/// Generous under nested TCG (a boot takes 3–5 s there), well inside the harness's limit.
const LIMIT: Duration = Duration::from_secs(60);
/// What the microVM launcher gives kindling-vmm guests, without the task drive.
const ARGS: &str = "console=ttyS0 reboot=k panic=-1 random.trust_cpu=on \
    kindling.root=/dev/vda kindling.hostname=jailed kindling.boot_timer=1 \
    i8042.dumbkbd i8042.noaux i8042.nomux i8042.nopnp";

/// The jailer, killed (with the VMM) if the test fails.
struct Jailer(Child);

impl Drop for Jailer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, console: &Path, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !done() {
        let log = std::fs::read_to_string(console).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "no {what} within {LIMIT:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn linux_boots_through_the_jailer_as_an_unprivileged_user() {
    let name = "linux_boots_through_the_jailer_as_an_unprivileged_user";
    let guest = LinuxGuest::find().unwrap();
    let vmm = match std::env::var_os(VMM_ENV) {
        Some(vmm) => PathBuf::from(vmm),
        None => kindling_images::locate::guest_bin_dir()
            .expect("the static binaries (scripts/build-guest.sh)")
            .join("kindling-vmm"),
    };
    let nested = guest
        .pack(NestedTest::new(name))
        .file_env(VMM_ENV, &vmm)
        .file(JAILER)
        .run_here_or_nested();
    if nested {
        return;
    }

    let tmp = tempfile::tempdir().unwrap();
    let sockets = tmp.path().join("vm");
    std::fs::create_dir(&sockets).unwrap();
    std::os::unix::fs::chown(&sockets, Some(UID), Some(UID)).unwrap();
    let uds = sockets.join("v.sock");
    // The host's end of the guest's port 9001, reachable by the VMM's user.
    let api_path = sockets.join("v.sock_9001");
    let runtime_api = UnixListener::bind(&api_path).unwrap();
    std::os::unix::fs::chown(&api_path, Some(UID), Some(UID)).unwrap();
    let config = tmp.path().join("vm.json");
    let json = serde_json::json!({
        "boot-source": {"kernel_image_path": guest.kernel, "initrd_path": guest.initrd,
                        "boot_args": ARGS},
        "drives": [{"drive_id": "root", "path_on_host": guest.rootfs,
                    "is_root_device": false, "is_read_only": true}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
        "vsock": {"guest_cid": 3, "uds_path": uds}
    });
    std::fs::write(&config, json.to_string()).unwrap();
    let console = tmp.path().join("console.log");
    let mut cmd = Command::new(JAILER);
    cmd.args([
        "--id",
        "boot",
        "--uid",
        &UID.to_string(),
        "--gid",
        &UID.to_string(),
    ])
    .arg("--exec-file")
    .arg(&vmm)
    .arg("--chroot-base-dir")
    .arg(tmp.path());
    for file in [&guest.kernel, &guest.initrd, &guest.rootfs, &config] {
        cmd.arg("--bind").arg(file);
    }
    let mut jailer = Jailer(
        cmd.arg("--bind-rw")
            .arg(&sockets)
            .args(["--", "--no-api", "--config-file"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&console).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(&console).unwrap_or_default();
    wait_for("bootstrap", &console, || {
        assert!(
            jailer.0.try_wait().unwrap().is_none(),
            "the jailer exited:\n{}",
            log()
        );
        log().contains("init: bootstrap started")
    });
    assert!(log().contains("switched root to /dev/vda"), "{}", log());

    // The VMM runs as the jail's user, and made its vsock socket in the socket folder.
    let jailer_pid = jailer.0.id();
    let children =
        std::fs::read_to_string(format!("/proc/{jailer_pid}/task/{jailer_pid}/children")).unwrap();
    let vmm_pid: u32 = children.trim().parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{vmm_pid}/status")).unwrap();
    assert!(
        status.contains(&format!("Uid:\t{UID}\t{UID}\t{UID}\t{UID}\n")),
        "{status}"
    );
    assert_eq!(std::fs::metadata(&uds).unwrap().uid(), UID);

    // Guest → host vsock through the jail: the bootstrap's first request arrives.
    runtime_api.set_nonblocking(true).unwrap();
    let mut conn = None;
    wait_for("vsock connection", &console, || {
        conn = runtime_api.accept().ok().map(|(c, _)| c);
        conn.is_some()
    });
    let conn = conn.unwrap();
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(LIMIT)).unwrap();
    let mut request = String::new();
    BufReader::new(&conn).read_line(&mut request).unwrap();
    assert!(request.ends_with(" HTTP/1.1\r\n"), "{request:?}");
    println!("the guest's first request over vsock: {}", request.trim());
    drop(conn);

    // SIGTERM to the jailer → the VMM → Ctrl-Alt-Del → init's clean shutdown → exit 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(jailer_pid).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut exited = None;
    wait_for("exit after SIGTERM", &console, || {
        exited = jailer.0.try_wait().unwrap();
        exited.is_some()
    });
    assert_eq!(exited.and_then(|s| s.code()), Some(0), "{}", log());
    assert!(log().contains("init: reboot (status"), "{}", log());
    assert!(!tmp.path().join("kindling-vmm").join("boot").exists());
}
