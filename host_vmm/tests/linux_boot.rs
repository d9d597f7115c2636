//! Linux boot end to end under KVM: the guest kernel and initramfs boot, init prints a marker
//! and reboots (i8042 reset) → the marker is in the serial log, the boot timer fired and the
//! VMM exited 0.
//!
//! Runs only where KVM runs guest ring 0 natively. A short CPL0 probe decides: on nested
//! `kvm_pvm` hosts ring 0 is instruction-emulated (see ENVIRONMENT.md) and the test prints
//! one SKIPPED line with the reason.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{kvm_or_skip, new_vm, scratch};
use kindling_vmm::cpu::EntryPoint;
use kindling_vmm::exit::ExitReason;
use vm_memory::{Bytes, GuestAddress};

/// `mov ecx, 2000000; l: dec ecx; jnz l; mov al, 0xfe; out 0x64, al`
const CPL0_LOOP: &[u8] = &[
    0xb9, 0x80, 0x84, 0x1e, 0x00, 0xff, 0xc9, 0x75, 0xfc, 0xb0, 0xfe, 0xe6, 0x64,
];
/// Natively the loop takes about a millisecond; emulated, seconds.
const PROBE_LIMIT: Duration = Duration::from_millis(500);

/// Whether this host's KVM runs guest kernel code natively, or why not.
fn cpl0_probe() -> Result<Duration, String> {
    let console = scratch("probe-console");
    let vm = new_vm(&console);
    vm.memory()
        .write_slice(CPL0_LOOP, GuestAddress(0x10000))
        .unwrap();
    let entry = EntryPoint {
        rip: 0x10000,
        rsp: 0x8ff0,
        rsi: 0,
        user_mode: false,
    };
    let started = Instant::now();
    let running = vm.start(entry, started).unwrap();
    let exit = running.exit().clone();
    std::thread::spawn(move || {
        std::thread::sleep(PROBE_LIMIT);
        exit.request(ExitReason::Stopped);
    });
    let (reason, _) = running.wait();
    let took = started.elapsed();
    let _ = std::fs::remove_file(console);
    match reason {
        ExitReason::GuestReset => Ok(took),
        ExitReason::Stopped => Err(format!(
            "KVM here does not run guest ring 0 natively (a 2M-iteration CPL0 loop did not finish in {PROBE_LIMIT:?}; nested kvm_pvm emulates ring 0)"
        )),
        other => Err(format!("the CPL0 probe ended with {other}")),
    }
}

#[test]
fn linux_boots_to_init_and_powers_off() {
    if !kvm_or_skip() {
        return;
    }
    let took = match cpl0_probe() {
        Ok(took) => took,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let (Some(kernel), Some(initrd)) = (
        std::env::var_os("KINDLING_KERNEL"),
        std::env::var_os("KINDLING_INITRD"),
    ) else {
        println!(
            "SKIPPED: KVM runs ring 0 natively (probe {took:?}) but KINDLING_KERNEL and KINDLING_INITRD are not both set"
        );
        return;
    };
    // Kindling's init prints this first; with no root drive attached it then reports the
    // missing /dev/vda and reboots, which ends the VM with exit code 0.
    let marker =
        std::env::var("KINDLING_BOOT_MARKER").unwrap_or_else(|_| "init: userspace at".into());
    let config = scratch("linux.json");
    let console = scratch("linux-console.log");
    let json = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "initrd_path": initrd,
                        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off kindling.boot_timer=1 kindling.root_wait_ms=200"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256}
    });
    std::fs::write(&config, json.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kindling-vmm"))
        .args(["--no-api", "--timings", "--config-file"])
        .arg(&config)
        .arg("--serial-out")
        .arg(&console)
        .output()
        .unwrap();
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stderr}\n--- console ---\n{log}"
    );
    assert!(
        log.contains(&marker),
        "marker {marker:?} missing from the console:\n{log}"
    );
    assert!(
        !stderr.contains("\"boot_timer_us\":null"),
        "the boot timer never fired: {stderr}"
    );
    let _ = std::fs::remove_file(config);
    let _ = std::fs::remove_file(console);
}
