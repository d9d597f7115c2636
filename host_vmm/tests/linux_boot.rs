//! Linux under kindling-vmm, end to end, with Kindling's own kernel, initramfs and `provided`
//! root image: the kernel boots to init, a real virtio-blk driver reads the root drive, the
//! bootstrap reaches the host over vsock, SIGTERM shuts the guest down cleanly, the
//! Firecracker API boots the same guest, pauses and resumes it, stops it, and snapshots it
//! into a fresh VMM; a guest on a tap answers ping before and after a snapshot moves it to
//! another tap; and Debian's stock cloud kernel, which finds its devices only through ACPI,
//! boots the same root image.
//!
//! They need a KVM that boots Linux. On metal they run here; on this project's machines
//! (nested `kvm_pvm`, which cannot) each test re-runs itself inside the nested-KVM harness
//! (`kindling-nested-kvm`: QEMU TCG with an emulated AMD SVM). They never skip.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{api_vmm, scratch, Client};
use kindling_nested_kvm::{LinuxGuest, NestedTest};
use serde_json::json;

const VMM: &str = env!("CARGO_BIN_EXE_kindling-vmm");
/// Nested TCG is slow, and slower still beside a build: generous (these boots take 2–5 s
/// inside the harness), never hit when it works, and well inside the harness's own limit so
/// that a hung guest fails with its console.
const BOOT_LIMIT: Duration = Duration::from_secs(60);
/// SIGTERM → VMM exit: init's grace for the bootstrap plus the reboot.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(20);
/// The host Runtime API port the bootstrap dials (CID 2), as a Unix socket `<uds>_9001`.
const RUNTIME_API_PORT: u32 = 9001;
/// What Kindling's microVM launcher gives kindling-vmm guests, without the task drive. No
/// `i8042.nopnp`: a kernel with ACPI finds the i8042 and its IRQ only through the DSDT (a
/// hardware-reduced machine maps no legacy IRQs), one without ignores PNP anyway.
const ROOT_ARGS: &str = "console=ttyS0 reboot=k panic=-1 random.trust_cpu=on \
    kindling.root=/dev/vda kindling.hostname=nested kindling.boot_timer=1 \
    i8042.dumbkbd i8042.noaux i8042.nomux";

/// The guest's files when test `name` runs here; `None` once it has run (and passed) inside
/// the nested-KVM harness instead, where KVM here cannot boot Linux (see
/// [`NestedTest::run_here_or_nested`]).
fn guest_here_or_nested(name: &str) -> Option<LinuxGuest> {
    here_or_nested(name, LinuxGuest::find().unwrap())
}

/// `guest` when test `name` runs here, as [`guest_here_or_nested`].
fn here_or_nested(name: &str, guest: LinuxGuest) -> Option<LinuxGuest> {
    let ran_nested = guest
        .pack(NestedTest::new(name))
        .file(VMM)
        .run_here_or_nested();
    (!ran_nested).then_some(guest)
}

/// Waits until the console file holds `marker`, or fails with the console.
fn wait_for_console(console: &Path, marker: &str, vmm: &mut Child) -> String {
    let deadline = Instant::now() + BOOT_LIMIT;
    loop {
        let log = std::fs::read_to_string(console).unwrap_or_default();
        if log.contains(marker) {
            return log;
        }
        if let Some(status) = vmm.try_wait().unwrap() {
            panic!("kindling-vmm exited ({status}) before {marker:?}:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "no {marker:?} within {BOOT_LIMIT:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits up to `limit` for the VMM to exit after `what`; kills it and fails the test with
/// the guest's console past that.
fn wait_for_exit(
    vmm: &mut Child,
    what: &str,
    limit: Duration,
    console: &Path,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = vmm.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = vmm.kill();
            let log = std::fs::read_to_string(console).unwrap_or_default();
            panic!("kindling-vmm still ran {limit:?} after {what}\n--- console ---\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends SIGTERM and waits for the VMM to exit within [`SHUTDOWN_LIMIT`]; its stderr.
fn sigterm_and_wait(
    mut vmm: Child,
    console: &Path,
) -> (std::process::ExitStatus, String, Duration) {
    let pid = i32::try_from(vmm.id()).unwrap();
    // SAFETY: signalling our own child process by its pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let sent = Instant::now();
    let status = wait_for_exit(&mut vmm, "SIGTERM", SHUTDOWN_LIMIT, console);
    let mut stderr = String::new();
    vmm.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr, sent.elapsed())
}

/// The `--timings` report on the VMM's stderr.
fn timings(stderr: &str) -> serde_json::Value {
    stderr
        .lines()
        .filter(|l| l.contains("kindling_vmm_timings"))
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["kindling_vmm_timings"].clone())
        .unwrap_or_else(|| panic!("no timings in {stderr}"))
}

/// The 2 MiB-page dTLB entries Linux finds on this host when it is an AMD CPU, as its
/// `cpu_detect_tlb_amd` reads them: the L2 TLB's (leaf 0x8000_0006), else the L1 TLB's
/// (0x8000_0005). `None` on other CPUs, whose Linux reads other leaves.
fn host_amd_tlb_2m() -> Option<u32> {
    use std::arch::x86_64::__cpuid;
    let amd = __cpuid(0).ebx == u32::from_le_bytes(*b"Auth");
    if !amd || __cpuid(0x8000_0000).eax < 0x8000_0006 {
        return None;
    }
    match (__cpuid(0x8000_0006).eax >> 16) & 0xfff {
        0 => Some((__cpuid(0x8000_0005).eax >> 16) & 0xff),
        l2 => Some(l2),
    }
}

#[test]
fn linux_boots_to_init_and_powers_off() {
    let Some(guest) = guest_here_or_nested("linux_boots_to_init_and_powers_off") else {
        return;
    };
    // Kindling's init prints this first; with no root drive attached it then reports the
    // missing /dev/vda and reboots, which ends the VM with exit code 0.
    let marker = "init: userspace at";
    let config = scratch("linux.json");
    let console = scratch("linux-console.log");
    let json = json!({
        "boot-source": {"kernel_image_path": guest.kernel, "initrd_path": guest.initrd,
                        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off kindling.boot_timer=1 kindling.root_wait_ms=200"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256}
    });
    std::fs::write(&config, json.to_string()).unwrap();
    let stderr_file = scratch("linux-stderr.log");
    let mut vmm = Command::new(VMM)
        .args(["--no-api", "--timings", "--config-file"])
        .arg(&config)
        .arg("--serial-out")
        .arg(&console)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_file).unwrap())
        .spawn()
        .unwrap();
    let status = wait_for_exit(&mut vmm, "the boot", BOOT_LIMIT, &console);
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_file).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{stderr}\n--- console ---\n{log}");
    assert!(
        log.contains(marker),
        "marker {marker:?} missing from the console:\n{log}"
    );
    // What the guest made of its CPUID: the host's brand string, and the TSC-deadline timer
    // where KVM emulates it and the host has one (without it Linux verifies the LAPIC timer
    // against the PIT).
    let brand: String = kindling_vmm::cpu::HostCpu::brand_of_this_cpu()
        .iter()
        .flatten()
        .flat_map(|r| r.to_le_bytes())
        .take_while(|&b| b != 0)
        .map(char::from)
        .collect();
    assert!(
        log.contains(&format!("smpboot: CPU0: {}", brand.trim())),
        "no brand {brand:?}:\n{log}"
    );
    // KVM's hypervisor leaves, and the host's TLBs (with the leaves as KVM passed them the
    // harness's guest found no TLB entries for 2 MiB pages).
    assert!(log.contains("Hypervisor detected: KVM"), "{log}");
    if let Some(expected) = host_amd_tlb_2m() {
        let line = log
            .lines()
            .find(|l| l.starts_with("Last level dTLB entries:"))
            .unwrap_or_else(|| panic!("no dTLB line:\n{log}"));
        assert!(
            line.contains(&format!(" 2MB {expected},")) && expected > 0,
            "the host has {expected} 2 MiB dTLB entries: {line}"
        );
    }
    let tsc_deadline = kindling_vmm::cpu::HostCpu::tsc_deadline_for_guests(
        kvm_ioctls::Kvm::new()
            .unwrap()
            .check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
    );
    assert_eq!(
        log.contains("TSC deadline timer available"),
        tsc_deadline,
        "{log}"
    );
    let timings = timings(&stderr);
    assert!(
        timings["boot_timer_us"].as_u64().is_some(),
        "the boot timer never fired: {stderr}"
    );
    assert_eq!(timings["exit_reason"], "guest reset (i8042)");
    // The boot's phases: the VMM's set-up, and init's milestone as the console carried it,
    // with the guest's own figure (its clock starts after the first KVM_RUN).
    let phases = &timings["setup_phases"];
    for phase in [
        "guest_memory_us",
        "kvm_vm_and_legacy_devices_us",
        "kernel_load_us",
        "vcpus_us",
    ] {
        assert!(phases[phase].as_u64().is_some(), "no {phase}: {stderr}");
    }
    let first_run = timings["instance_start_to_first_kvm_run_us"].as_u64();
    let userspace = timings["instance_start_to_userspace_us"].as_u64();
    let guest = timings["guest_userspace_s"].as_f64();
    assert!(
        matches!((first_run, userspace, guest), (Some(r), Some(u), Some(g)) if r < u && g > 0.0),
        "no userspace milestone after the first KVM_RUN: {stderr}"
    );
    for f in [config, console, stderr_file] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn the_root_drive_boots_the_bootstrap_which_dials_the_host_and_sigterm_shuts_it_down() {
    let Some(guest) = guest_here_or_nested(
        "the_root_drive_boots_the_bootstrap_which_dials_the_host_and_sigterm_shuts_it_down",
    ) else {
        return;
    };
    let config = scratch("root.json");
    let console = scratch("root-console.log");
    let uds = scratch("v.sock");
    // Firecracker's hybrid vsock: the guest's connection to CID 2 port P reaches `<uds>_P`.
    let runtime_api = UnixListener::bind(format!("{}_{RUNTIME_API_PORT}", uds.display())).unwrap();
    let json = json!({
        "boot-source": {"kernel_image_path": guest.kernel, "initrd_path": guest.initrd,
                        "boot_args": ROOT_ARGS},
        "drives": [{"drive_id": "root", "path_on_host": guest.rootfs,
                    "is_root_device": false, "is_read_only": true}],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
        "vsock": {"guest_cid": 3, "uds_path": uds}
    });
    std::fs::write(&config, json.to_string()).unwrap();
    let mut vmm = Command::new(VMM)
        .args(["--no-api", "--timings", "--config-file"])
        .arg(&config)
        .arg("--serial-out")
        .arg(&console)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The bootstrap lives on the root drive: reaching it means Linux's virtio-blk driver
    // read the ext4 image through the VMM.
    let log = wait_for_console(&console, "init: bootstrap started", &mut vmm);
    assert!(log.contains("switched root to /dev/vda"), "{log}");

    // Guest → host vsock: the bootstrap's first request (the relayed `/next`, or its report
    // that the runtime could not start: there is no function here) arrives on the host.
    runtime_api.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + BOOT_LIMIT;
    let conn = loop {
        match runtime_api.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "the bootstrap never dialled the host"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(BOOT_LIMIT)).unwrap();
    let mut request = String::new();
    BufReader::new(&conn).read_line(&mut request).unwrap();
    let path = request.split_whitespace().nth(1).unwrap_or_default();
    assert!(
        request.ends_with(" HTTP/1.1\r\n")
            && (path.starts_with("/2018-06-01/runtime/") || path.starts_with("/kindling/v1/")),
        "{request:?}"
    );
    println!("the guest's first request over vsock: {}", request.trim());
    drop(conn);

    // SIGTERM → Ctrl-Alt-Del on the i8042 → init's clean shutdown → reboot → exit 0.
    let (status, stderr, took) = sigterm_and_wait(vmm, &console);
    let log = std::fs::read_to_string(&console).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}\n--- console ---\n{log}");
    assert!(log.contains("init: reboot (status"), "{log}");
    let timings = timings(&stderr);
    assert_eq!(timings["exit_reason"], "guest reset (i8042)");
    // The boot's breakdown, as `--timings` prints it, from the VMM's set-up to the bootstrap.
    let (userspace, bootstrap) = (
        timings["guest_userspace_s"].as_f64().unwrap_or_default(),
        timings["guest_bootstrap_started_s"]
            .as_f64()
            .unwrap_or_default(),
    );
    assert!(
        0.0 < userspace
            && userspace <= bootstrap
            && timings["guest_userspace_to_bootstrap_started_s"]
                .as_f64()
                .is_some_and(|s| (s - (bootstrap - userspace)).abs() < 1e-6)
            && timings["instance_start_to_bootstrap_started_us"].as_u64()
                > timings["instance_start_to_userspace_us"].as_u64(),
        "{timings}"
    );
    println!("boot phases: {timings}");
    println!("SIGTERM → exit in {took:?}");
    for f in [config, console] {
        let _ = std::fs::remove_file(f);
    }
}

/// Counts the guest's connections to a host vsock port, closing each at once: the bootstrap
/// then retries about once a second, a heartbeat that stops only when the guest does.
fn count_connections(listener: UnixListener) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    count
}

/// Waits until `count` passes `past`, or fails saying `what`.
fn wait_past(count: &AtomicUsize, past: usize, what: &str) {
    let deadline = Instant::now() + BOOT_LIMIT;
    while count.load(Ordering::SeqCst) <= past {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Boots `guest` through the API: `boot_args`, its root drive, `machine` (the
/// machine-config), each of `devices` (a PUT path and body), vsock at `uds`, InstanceStart.
fn boot_through_api(
    api: &mut Client,
    guest: &LinuxGuest,
    boot_args: &str,
    machine: serde_json::Value,
    devices: &[(&str, serde_json::Value)],
    uds: &Path,
) {
    let mut calls = vec![
        (
            "/boot-source",
            json!({"kernel_image_path": guest.kernel, "initrd_path": guest.initrd,
                   "boot_args": boot_args}),
        ),
        (
            "/drives/root",
            json!({"drive_id": "root", "path_on_host": guest.rootfs,
                   "is_root_device": false, "is_read_only": true}),
        ),
        ("/machine-config", machine),
    ];
    calls.extend(devices.iter().cloned());
    calls.push(("/vsock", json!({"guest_cid": 3, "uds_path": uds})));
    calls.push(("/actions", json!({"action_type": "InstanceStart"})));
    for (path, body) in calls {
        let (code, fault) = api.call("PUT", path, Some(body));
        assert_eq!(code, 204, "PUT {path}: {fault:?}");
    }
}

/// Pauses the VM and takes a full snapshot of it.
fn pause_and_snapshot(api: &mut Client, state_file: &Path, mem_file: &Path) {
    let (code, fault) = api.call("PATCH", "/vm", Some(json!({"state": "Paused"})));
    assert_eq!(code, 204, "{fault:?}");
    let (code, fault) = api.call(
        "PUT",
        "/snapshot/create",
        Some(json!({"snapshot_path": state_file, "mem_file_path": mem_file})),
    );
    assert_eq!(code, 204, "{fault:?}");
}

/// Presses Ctrl-Alt-Del through the API and waits for the guest's clean shutdown to end the
/// VMM with status 0; the console.
fn ctrl_alt_del_and_wait(api: &mut Client, vmm: &mut Child, console: &Path) -> String {
    let (code, fault) = api.call(
        "PUT",
        "/actions",
        Some(json!({"action_type": "SendCtrlAltDel"})),
    );
    assert_eq!(code, 204, "{fault:?}");
    let status = wait_for_exit(vmm, "SendCtrlAltDel", SHUTDOWN_LIMIT, console);
    let log = std::fs::read_to_string(console).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("init: reboot (status"), "{log}");
    log
}

#[test]
fn the_firecracker_api_boots_pauses_resumes_and_stops_linux() {
    let Some(guest) =
        guest_here_or_nested("the_firecracker_api_boots_pauses_resumes_and_stops_linux")
    else {
        return;
    };
    let sock = scratch("api.sock");
    let console = scratch("api-console.log");
    let uds = scratch("api-v.sock");
    let dials = count_connections(
        UnixListener::bind(format!("{}_{RUNTIME_API_PORT}", uds.display())).unwrap(),
    );
    let mut vmm = api_vmm(&sock, &console).arg("--timings").spawn().unwrap();
    let mut api = Client::connect(&sock);
    let (code, fault) = api.call("PATCH", "/vm", Some(json!({"state": "Paused"})));
    assert_eq!(code, 400, "pausing before the start: {fault:?}");
    let machine = json!({"vcpu_count": 2, "mem_size_mib": 256});
    boot_through_api(&mut api, &guest, ROOT_ARGS, machine, &[], &uds);
    let state = |api: &mut Client| api.call("GET", "/", None).1.unwrap()["state"].clone();
    assert_eq!(state(&mut api), json!("Running"));
    wait_for_console(&console, "init: bootstrap started", &mut vmm);
    wait_past(&dials, 1, "the bootstrap never dialled the host twice");

    // Paused: both vCPUs are parked, so the guest's retries stop. One already on its way
    // through the VMM's vsock device (which keeps running) may still land: settle first.
    let (code, fault) = api.call("PATCH", "/vm", Some(json!({"state": "Paused"})));
    assert_eq!(code, 204, "{fault:?}");
    assert_eq!(state(&mut api), json!("Paused"));
    std::thread::sleep(Duration::from_millis(1500));
    let before = dials.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        dials.load(Ordering::SeqCst),
        before,
        "the guest dialled the host while paused"
    );
    let (code, fault) = api.call("PATCH", "/vm", Some(json!({"state": "Paused"})));
    assert_eq!(code, 204, "pausing a paused VM: {fault:?}");

    let (code, fault) = api.call("PATCH", "/vm", Some(json!({"state": "Resumed"})));
    assert_eq!(code, 204, "{fault:?}");
    assert_eq!(state(&mut api), json!("Running"));
    wait_past(
        &dials,
        before,
        "the guest did not dial the host again after resuming",
    );

    ctrl_alt_del_and_wait(&mut api, &mut vmm, &console);
    assert!(!sock.exists(), "the API socket is removed at exit");
    let _ = std::fs::remove_file(console);
}

#[test]
fn a_snapshot_of_running_linux_restores_in_a_fresh_vmm_with_its_devices() {
    let Some(guest) = guest_here_or_nested(
        "a_snapshot_of_running_linux_restores_in_a_fresh_vmm_with_its_devices",
    ) else {
        return;
    };
    let (state_file, mem_file) = (scratch("linux.state"), scratch("linux.mem"));
    let (sock, console, uds) = (
        scratch("snap-a.sock"),
        scratch("snap-a.console"),
        scratch("snap-a-v.sock"),
    );
    let dials_a = count_connections(
        UnixListener::bind(format!("{}_{RUNTIME_API_PORT}", uds.display())).unwrap(),
    );
    let mut original = api_vmm(&sock, &console).spawn().unwrap();
    let mut api = Client::connect(&sock);
    let machine = json!({"vcpu_count": 2, "mem_size_mib": 128});
    boot_through_api(&mut api, &guest, ROOT_ARGS, machine, &[], &uds);
    wait_for_console(&console, "init: bootstrap started", &mut original);
    wait_past(&dials_a, 1, "the bootstrap never dialled the host twice");
    pause_and_snapshot(&mut api, &state_file, &mem_file);
    // The original is done with: its guest shuts down as usual.
    let (status, stderr, _) = sigterm_and_wait(original, &console);
    assert_eq!(status.code(), Some(0), "{stderr}");

    // A fresh VMM with another vsock socket: the guest runs on from the snapshot without
    // booting, its bootstrap dials the new socket, its root drive and console still work.
    // Half its memory is read in at load (Kindling's `prefetch`), half mapped lazily.
    let (sock, console, uds) = (
        scratch("snap-b.sock"),
        scratch("snap-b.console"),
        scratch("snap-b-v.sock"),
    );
    let dials_b = count_connections(
        UnixListener::bind(format!("{}_{RUNTIME_API_PORT}", uds.display())).unwrap(),
    );
    let mut restored = api_vmm(&sock, &console).spawn().unwrap();
    let mut api = Client::connect(&sock);
    let started = Instant::now();
    let (code, fault) = api.call(
        "PUT",
        "/snapshot/load",
        Some(json!({"snapshot_path": state_file,
                    "mem_backend": {"backend_type": "File", "backend_path": mem_file},
                    "vsock_override": {"uds_path": uds},
                    "prefetch": [{"offset": 0, "len": 32 << 20}, {"offset": 96 << 20, "len": 32 << 20}],
                    "resume_vm": true})),
    );
    assert_eq!(code, 204, "{fault:?}");
    wait_past(
        &dials_b,
        0,
        "the restored guest never dialled the new vsock socket",
    );
    let first_dial = started.elapsed();
    wait_past(
        &dials_b,
        1,
        "the restored guest's bootstrap stopped retrying",
    );
    let log = ctrl_alt_del_and_wait(&mut api, &mut restored, &console);
    assert!(
        !log.contains("Linux version"),
        "the restored guest booted again:\n{log}"
    );
    println!("restore → first vsock dial: {first_dial:?}");
    for f in [state_file, mem_file, console] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn debian_s_stock_cloud_kernel_finds_its_devices_in_the_acpi_tables() {
    let Some(guest) = here_or_nested(
        "debian_s_stock_cloud_kernel_finds_its_devices_in_the_acpi_tables",
        LinuxGuest::stock().unwrap(),
    ) else {
        return;
    };
    let config = scratch("stock.json");
    let console = scratch("stock-console.log");
    let uds = scratch("stock-v.sock");
    let dials = count_connections(
        UnixListener::bind(format!("{}_{RUNTIME_API_PORT}", uds.display())).unwrap(),
    );
    let json = json!({
        "boot-source": {"kernel_image_path": guest.kernel, "initrd_path": guest.initrd,
                        "boot_args": ROOT_ARGS},
        "drives": [{"drive_id": "root", "path_on_host": guest.rootfs,
                    "is_root_device": false, "is_read_only": true}],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
        "vsock": {"guest_cid": 3, "uds_path": uds}
    });
    std::fs::write(&config, json.to_string()).unwrap();
    let mut vmm = Command::new(VMM)
        .args(["--no-api", "--config-file"])
        .arg(&config)
        .arg("--serial-out")
        .arg(&console)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = wait_for_console(&console, "init: bootstrap started", &mut vmm);
    assert!(log.contains("ACPI: RSDP 0x00000000000E0000"), "{log}");
    assert!(
        log.contains("ACPI: DSDT") && log.contains("ACPI: APIC"),
        "{log}"
    );
    assert!(!log.contains("MADT or MP tables are not detected"), "{log}");
    assert!(log.contains("smp: Brought up 1 node, 2 CPUs"), "{log}");
    assert!(log.contains("switched root to /dev/vda"), "{log}");
    wait_past(&dials, 0, "the bootstrap never dialled the host over vsock");
    // SIGTERM → Ctrl-Alt-Del through the i8042 that the FADT declares → clean shutdown.
    let (status, stderr, _) = sigterm_and_wait(vmm, &console);
    let log = std::fs::read_to_string(&console).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}\n--- console ---\n{log}");
    assert!(log.contains("init: reboot (status"), "{log}");
    for f in [config, console] {
        let _ = std::fs::remove_file(f);
    }
}

/// Accepts the guest's connections and holds them open, unanswered: the bootstrap's
/// request waits on one until the connection breaks. Counts them.
fn hold_connections(listener: UnixListener) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    count
}

#[test]
fn a_snapshot_resets_the_guest_s_open_vsock_connections() {
    let Some(guest) = guest_here_or_nested("a_snapshot_resets_the_guest_s_open_vsock_connections")
    else {
        return;
    };
    let (state_file, mem_file) = (scratch("reset.state"), scratch("reset.mem"));
    let (sock, console, uds) = (
        scratch("reset.sock"),
        scratch("reset.console"),
        scratch("reset-v.sock"),
    );
    let dials = hold_connections(
        UnixListener::bind(format!("{}_{RUNTIME_API_PORT}", uds.display())).unwrap(),
    );
    let mut vmm = api_vmm(&sock, &console)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut api = Client::connect(&sock);
    let machine = json!({"vcpu_count": 2, "mem_size_mib": 128});
    boot_through_api(&mut api, &guest, ROOT_ARGS, machine, &[], &uds);
    wait_for_console(&console, "init: bootstrap started", &mut vmm);
    wait_past(&dials, 0, "the bootstrap never dialled the host");
    // Its request now waits on the held connection: no new dial without a reset.
    std::thread::sleep(Duration::from_secs(3));
    let before = dials.load(Ordering::SeqCst);
    pause_and_snapshot(&mut api, &state_file, &mem_file);
    let (code, fault) = api.call("PATCH", "/vm", Some(json!({"state": "Resumed"})));
    assert_eq!(code, 204, "{fault:?}");
    wait_past(
        &dials,
        before,
        "the original guest kept its connection through the snapshot",
    );
    let (status, stderr, _) = sigterm_and_wait(vmm, &console);
    assert_eq!(status.code(), Some(0), "{stderr}");

    // A clone wakes up with the same request on a connection its VMM never had: the reset
    // is in its memory, so it dials its own socket.
    let (sock, console, uds) = (
        scratch("reset-b.sock"),
        scratch("reset-b.console"),
        scratch("reset-b-v.sock"),
    );
    let clone_dials = hold_connections(
        UnixListener::bind(format!("{}_{RUNTIME_API_PORT}", uds.display())).unwrap(),
    );
    let mut clone = api_vmm(&sock, &console)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut api = Client::connect(&sock);
    let (code, fault) = api.call(
        "PUT",
        "/snapshot/load",
        Some(json!({"snapshot_path": state_file,
                    "mem_backend": {"backend_type": "File", "backend_path": mem_file},
                    "vsock_override": {"uds_path": uds},
                    "resume_vm": true})),
    );
    assert_eq!(code, 204, "{fault:?}");
    wait_past(&clone_dials, 0, "the clone never dialled its own socket");
    let _ = clone.kill();
    let _ = clone.wait();
    for f in [state_file, mem_file, console] {
        let _ = std::fs::remove_file(f);
    }
}

/// The guest's and the host's addresses on the tap (TEST-NET-2: nothing is routed anywhere).
const GUEST_IP: &str = "198.51.100.2";
const HOST_IP: &str = "198.51.100.1";
const GUEST_MAC: &str = "06:00:c6:33:64:02";

/// Gives the host end of tap `name` (made by kindling-vmm, which opened it) the host address
/// and brings it up, then pings the guest from the host: ARP and ICMP both ways through the
/// virtio-net device.
fn ping_guest_through(tap: &str) -> String {
    let ip = |args: &str| {
        let out = Command::new("sh")
            .args(["-c", &format!("ip {args}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args}: {out:?}");
    };
    ip(&format!("addr add {HOST_IP}/24 dev {tap}"));
    ip(&format!("link set {tap} up"));
    let out = Command::new("ping")
        .args(["-c", "3", "-w", "30", GUEST_IP])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("3 packets received"),
        "ping through {tap}: {out:?}"
    );
    text
}

#[test]
fn a_guest_on_a_tap_answers_ping_and_again_from_a_snapshot_on_another_tap() {
    let Some(guest) = guest_here_or_nested(
        "a_guest_on_a_tap_answers_ping_and_again_from_a_snapshot_on_another_tap",
    ) else {
        return;
    };
    // A network namespace of the test's own (inherited by kindling-vmm, `ip` and `ping`): the
    // taps and their address never touch the host's network, on metal or in the harness.
    // SAFETY: unshare(2) with CLONE_NEWNET moves only this thread and what it starts later;
    // no memory is involved.
    let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(unshared, 0, "{}", std::io::Error::last_os_error());
    let (state_file, mem_file) = (scratch("net.state"), scratch("net.mem"));
    let (sock, console, uds) = (
        scratch("net-a.sock"),
        scratch("net-a.console"),
        scratch("net-a-v.sock"),
    );
    let dials = count_connections(
        UnixListener::bind(format!("{}_{RUNTIME_API_PORT}", uds.display())).unwrap(),
    );
    let mut original = api_vmm(&sock, &console).spawn().unwrap();
    let mut api = Client::connect(&sock);
    // The kernel configures eth0 from `ip=` before init runs
    // (client:server:gateway:netmask:hostname:device:autoconf).
    let boot_args = format!("{ROOT_ARGS} ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off");
    let eth0 = (
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "kn0", "guest_mac": GUEST_MAC}),
    );
    let machine = json!({"vcpu_count": 1, "mem_size_mib": 128});
    boot_through_api(&mut api, &guest, &boot_args, machine, &[eth0], &uds);
    let log = wait_for_console(&console, "init: bootstrap started", &mut original);
    // Linux's virtio-net driver read the MAC from the config space.
    assert!(
        log.contains(&format!("hwaddr={GUEST_MAC}, ipaddr={GUEST_IP}")),
        "{log}"
    );
    wait_past(&dials, 0, "the bootstrap never dialled the host");
    println!("{}", ping_guest_through("kn0"));
    pause_and_snapshot(&mut api, &state_file, &mem_file);
    // The original shuts down; its tap goes with it.
    let (status, stderr, _) = sigterm_and_wait(original, &console);
    assert_eq!(status.code(), Some(0), "{stderr}");

    let (sock, console, uds) = (
        scratch("net-b.sock"),
        scratch("net-b.console"),
        scratch("net-b-v.sock"),
    );
    let _dials = count_connections(
        UnixListener::bind(format!("{}_{RUNTIME_API_PORT}", uds.display())).unwrap(),
    );
    let mut restored = api_vmm(&sock, &console).spawn().unwrap();
    let mut api = Client::connect(&sock);
    let load = |overrides: serde_json::Value| {
        json!({"snapshot_path": state_file,
               "mem_backend": {"backend_type": "File", "backend_path": mem_file},
               "vsock_override": {"uds_path": uds},
               "network_overrides": overrides,
               "resume_vm": true})
    };
    let (code, fault) = api.call(
        "PUT",
        "/snapshot/load",
        Some(load(json!([{"iface_id": "eth9", "host_dev_name": "kn1"}]))),
    );
    let fault = fault.as_ref().and_then(|f| f["fault_message"].as_str());
    assert_eq!(code, 400, "an override for an interface the snapshot lacks");
    assert!(
        fault.is_some_and(|f| f.contains("no network interface \"eth9\"")),
        "{fault:?}"
    );
    let (code, fault) = api.call(
        "PUT",
        "/snapshot/load",
        Some(load(json!([{"iface_id": "eth0", "host_dev_name": "kn1"}]))),
    );
    assert_eq!(code, 204, "{fault:?}");
    // The restored guest, on another tap, answers as before: same MAC and address.
    println!("{}", ping_guest_through("kn1"));
    let log = ctrl_alt_del_and_wait(&mut api, &mut restored, &console);
    assert!(
        !log.contains("Linux version"),
        "the restored guest booted again:\n{log}"
    );
    for f in [state_file, mem_file, console] {
        let _ = std::fs::remove_file(f);
    }
}
