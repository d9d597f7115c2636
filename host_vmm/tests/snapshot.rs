//! Snapshots through the Firecracker API on real kindling-vmm processes: a paused VM is saved,
//! a fresh VMM loads it and the guest runs on from where it was; loads that cannot work are
//! refused with a fault message and leave the VMM as it was. (The same with a Linux guest and
//! its devices runs in the nested-KVM harness: tests/linux_boot.rs.)

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{api_vmm, elf_kernel, kvm_or_skip, scratch, Client, KillOnDrop, DOTS_KERNEL};
use serde_json::{json, Value};

fn fault(resp: &(u16, Option<Value>)) -> String {
    assert_eq!(resp.0, 400, "{resp:?}");
    resp.1.as_ref().unwrap()["fault_message"]
        .as_str()
        .unwrap()
        .to_string()
}

fn vmm(sock: &Path, console: &Path) -> KillOnDrop {
    KillOnDrop::new(api_vmm(sock, console).spawn().unwrap())
}

fn size(file: &Path) -> u64 {
    std::fs::metadata(file).map_or(0, |m| m.len())
}

/// Waits up to 5 s for `file` to grow past `past` bytes.
fn grows_past(file: &Path, past: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if size(file) > past {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn put(c: &mut Client, path: &str, body: Value) {
    let resp = c.call("PUT", path, Some(body));
    assert_eq!(resp.0, 204, "PUT {path}: {resp:?}");
}

fn patch_vm(c: &mut Client, state: &str) {
    let resp = c.call("PATCH", "/vm", Some(json!({ "state": state })));
    assert_eq!(resp.0, 204, "PATCH /vm {state}: {resp:?}");
}

fn state(c: &mut Client) -> Value {
    c.call("GET", "/", None).1.unwrap()["state"].clone()
}

fn load(snapshot: &Path, mem: &Path, resume: bool) -> Value {
    json!({
        "snapshot_path": snapshot,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": resume,
    })
}

/// Stops a VMM with SIGTERM (these guests have no keyboard driver: exit code 5).
fn stop(mut child: KillOnDrop) {
    child.sigterm();
    let status = child.exit_within(Duration::from_secs(10), "the VMM ignored SIGTERM");
    assert_eq!(status.code(), Some(5));
}

struct Files {
    snapshot: PathBuf,
    mem: PathBuf,
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.snapshot);
        let _ = std::fs::remove_file(&self.mem);
    }
}

#[test]
fn a_paused_vm_is_saved_and_a_fresh_vmm_runs_it_on() {
    if !kvm_or_skip() {
        return;
    }
    let kernel = scratch("snap-vmlinux");
    std::fs::write(&kernel, elf_kernel(DOTS_KERNEL)).unwrap();
    let files = Files {
        snapshot: scratch("snap.state"),
        mem: scratch("snap.mem"),
    };
    let create = json!({"snapshot_type": "Full", "snapshot_path": files.snapshot,
                        "mem_file_path": files.mem});

    let (sock, console) = (scratch("snap-a.sock"), scratch("snap-a.console"));
    let original = vmm(&sock, &console);
    let mut a = Client::connect(&sock);
    assert!(
        fault(&a.call("PUT", "/snapshot/create", Some(create.clone()))).contains("before starting")
    );
    put(&mut a, "/boot-source", json!({"kernel_image_path": kernel}));
    put(
        &mut a,
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 64}),
    );
    put(&mut a, "/actions", json!({"action_type": "InstanceStart"}));
    assert!(grows_past(&console, 0), "the guest never printed");
    assert!(
        fault(&a.call("PUT", "/snapshot/create", Some(create.clone()))).contains("must be paused")
    );

    patch_vm(&mut a, "Paused");
    put(&mut a, "/snapshot/create", create.clone());
    assert_eq!(size(&files.mem), 64 << 20, "the memory file is guest RAM");
    let saved: Value = serde_json::from_slice(&std::fs::read(&files.snapshot).unwrap()).unwrap();
    assert_eq!(saved["format"], "kindling-vmm snapshot");
    assert_eq!(saved["version"], 1);
    assert_eq!(saved["vcpus"].as_array().unwrap().len(), 2);
    // The original runs on after its snapshot.
    let printed = size(&console);
    patch_vm(&mut a, "Resumed");
    assert!(grows_past(&console, printed), "the original did not run on");
    stop(original);

    let (sock, console) = (scratch("snap-b.sock"), scratch("snap-b.console"));
    let restored = vmm(&sock, &console);
    let mut b = Client::connect(&sock);
    put(
        &mut b,
        "/snapshot/load",
        load(&files.snapshot, &files.mem, false),
    );
    assert_eq!(state(&mut b), "Paused", "loaded without resume_vm");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(size(&console), 0, "a paused restore ran guest code");
    assert_eq!(
        b.call("GET", "/machine-config", None).0,
        200,
        "the API still answers"
    );
    patch_vm(&mut b, "Resumed");
    assert_eq!(state(&mut b), "Running");
    assert!(
        grows_past(&console, 0),
        "the restored guest did not run on from the saved instruction"
    );
    assert!(fault(&b.call(
        "PUT",
        "/snapshot/load",
        Some(load(&files.snapshot, &files.mem, true))
    ))
    .contains("after starting"));
    // A snapshot of the restored VM restores too (state files are not one-shot).
    patch_vm(&mut b, "Paused");
    put(&mut b, "/snapshot/create", create);
    stop(restored);

    // This time with the first 4 MiB (the guest's code and stack) and a range further on
    // read in at once (Kindling's `prefetch`): the guest runs the same, and the memory
    // file is left as it was.
    let mem_before = std::fs::read(&files.mem).unwrap();
    let (sock, console) = (scratch("snap-c.sock"), scratch("snap-c.console"));
    let again = vmm(&sock, &console);
    let mut c = Client::connect(&sock);
    let mut prefetched = load(&files.snapshot, &files.mem, true);
    prefetched["prefetch"] =
        json!([{"offset": 0, "len": 4 << 20}, {"offset": 32 << 20, "len": 2 << 20}]);
    put(&mut c, "/snapshot/load", prefetched);
    assert_eq!(state(&mut c), "Running", "resume_vm runs it at once");
    assert!(grows_past(&console, 0), "the second restore did not run");
    stop(again);
    assert!(
        std::fs::read(&files.mem).unwrap() == mem_before,
        "a restored VM changed its memory file"
    );
    std::fs::remove_file(kernel).unwrap();
}

#[test]
fn loads_that_cannot_work_are_refused_and_change_nothing() {
    let files = Files {
        snapshot: scratch("bad.state"),
        mem: scratch("bad.mem"),
    };
    let (sock, console) = (scratch("bad.sock"), scratch("bad.console"));
    let child = vmm(&sock, &console);
    let mut c = Client::connect(&sock);
    let mut refused = |body: Value| fault(&c.call("PUT", "/snapshot/load", Some(body)));

    let missing = refused(load(&files.snapshot, &files.mem, true));
    assert!(
        missing.contains("bad.state") && missing.contains("No such file"),
        "{missing}"
    );
    std::fs::write(&files.snapshot, "not json").unwrap();
    assert!(
        refused(load(&files.snapshot, &files.mem, true)).contains("is not a kindling-vmm snapshot")
    );
    std::fs::write(
        &files.snapshot,
        r#"{"format": "firecracker", "version": 1}"#,
    )
    .unwrap();
    assert!(
        refused(load(&files.snapshot, &files.mem, true)).contains("its format is \"firecracker\"")
    );
    std::fs::write(
        &files.snapshot,
        r#"{"format": "kindling-vmm snapshot", "version": 99, "vcpus": "from the future"}"#,
    )
    .unwrap();
    let version = refused(load(&files.snapshot, &files.mem, true));
    assert!(
        version.contains("version 99 snapshot; this kindling-vmm reads version 1"),
        "{version}"
    );
    assert!(refused(json!({"snapshot_path": files.snapshot})).contains("Exactly one of"));
    assert!(refused(json!({"snapshot_path": files.snapshot,
                           "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}))
    .contains("Only the File memory backend"));
    let mut unaligned = load(&files.snapshot, &files.mem, true);
    unaligned["prefetch"] = json!([{"offset": 4096, "len": 100}]);
    assert!(refused(unaligned).contains("is not page-aligned"));

    // Nothing above changed the VMM: it is not started, and once configured it refuses loads.
    assert_eq!(state(&mut c), "Not started");
    put(
        &mut c,
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    assert!(fault(&c.call(
        "PUT",
        "/snapshot/load",
        Some(load(&files.snapshot, &files.mem, true))
    ))
    .contains("not allowed after configuring boot-specific resources"));
    stop(child);
    let _ = std::fs::remove_file(console);
}

#[test]
fn a_memory_file_of_the_wrong_size_is_refused() {
    if !kvm_or_skip() {
        return;
    }
    let kernel = scratch("size-vmlinux");
    std::fs::write(&kernel, elf_kernel(DOTS_KERNEL)).unwrap();
    let files = Files {
        snapshot: scratch("size.state"),
        mem: scratch("size.mem"),
    };
    let (sock, console) = (scratch("size-a.sock"), scratch("size-a.console"));
    let original = vmm(&sock, &console);
    let mut a = Client::connect(&sock);
    put(&mut a, "/boot-source", json!({"kernel_image_path": kernel}));
    put(
        &mut a,
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    put(&mut a, "/actions", json!({"action_type": "InstanceStart"}));
    patch_vm(&mut a, "Paused");
    put(
        &mut a,
        "/snapshot/create",
        json!({"snapshot_path": files.snapshot, "mem_file_path": files.mem}),
    );
    stop(original);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&files.mem)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();

    let (sock, console) = (scratch("size-b.sock"), scratch("size-b.console"));
    let child = vmm(&sock, &console);
    let mut b = Client::connect(&sock);
    let refused = fault(&b.call(
        "PUT",
        "/snapshot/load",
        Some(load(&files.snapshot, &files.mem, true)),
    ));
    assert!(
        refused.contains("16777216 bytes, the snapshot's guest has 33554432"),
        "{refused}"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&files.mem)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let mut past_the_end = load(&files.snapshot, &files.mem, true);
    past_the_end["prefetch"] = json!([{"offset": 30 << 20, "len": 4 << 20}]);
    let refused = fault(&b.call("PUT", "/snapshot/load", Some(past_the_end)));
    assert!(
        refused.contains("is not within the 33554432 bytes"),
        "{refused}"
    );
    assert_eq!(state(&mut b), "Not started");
    stop(child);
    std::fs::remove_file(kernel).unwrap();
}
