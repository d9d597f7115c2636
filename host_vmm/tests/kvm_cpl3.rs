//! Real KVM, real exits: a CPL3 guest drives the serial port, the boot timer and the i8042.

mod common;

use std::time::Duration;

use common::{
    kvm_or_skip, new_vm, new_vm_full, new_vm_with, run_script, scratch, serial_print, Op, RESET,
};
use kindling_nested_kvm::NestedTest;
use kindling_vmm::cpu_template::CpuTemplate;
use kindling_vmm::exit::ExitReason;

#[test]
fn serial_boot_timer_and_i8042_reset_through_real_exits() {
    if !kvm_or_skip() {
        return;
    }
    let console = scratch("console");
    let vm = new_vm(&console);
    let mut script = serial_print("hello from CPL3\n");
    script.push(Op::Write8(0xd000_0000, 123));
    script.push(RESET);
    script.extend(serial_print("never printed"));
    let (reason, timings) = run_script(vm, &script, Duration::from_secs(20));

    assert_eq!(reason, ExitReason::GuestReset);
    assert_eq!(reason.exit_code(), 0);
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        "hello from CPL3\n"
    );
    let boot = timings.boot_timer.expect("boot timer write was recorded");
    let first_run = timings.first_kvm_run.expect("first KVM_RUN was recorded");
    assert!(first_run <= boot, "{timings:?}");
    std::fs::remove_file(console).unwrap();
}

#[test]
fn a_boot_timer_write_of_another_value_is_ignored() {
    if !kvm_or_skip() {
        return;
    }
    let console = scratch("console");
    let vm = new_vm(&console);
    let script = [Op::Write8(0xd000_0000, 7), RESET];
    let (reason, timings) = run_script(vm, &script, Duration::from_secs(20));
    assert_eq!(reason, ExitReason::GuestReset);
    assert_eq!(timings.boot_timer, None);
    std::fs::remove_file(console).unwrap();
}

#[test]
fn a_guest_fault_is_a_triple_fault_exit() {
    if !kvm_or_skip() {
        return;
    }
    let console = scratch("console");
    let vm = new_vm(&console);
    // An empty script ends in `hlt` at CPL3: #GP with no IDT, then a triple fault.
    let (reason, _) = run_script(vm, &serial_print("x"), Duration::from_secs(20));
    assert_eq!(reason, ExitReason::TripleFault);
    assert_eq!(reason.exit_code(), 3);
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "x");
    std::fs::remove_file(console).unwrap();
}

#[test]
fn waiting_application_processors_are_stopped_with_the_vm() {
    if !kvm_or_skip() {
        return;
    }
    let console = scratch("console");
    // vCPU 1 waits in KVM_RUN for an INIT/SIPI that never comes; the reset must still end
    // the VM, which means kicking that vCPU out of KVM_RUN.
    let vm = new_vm_with(&console, 2);
    let mut script = serial_print("smp\n");
    script.push(RESET);
    let (reason, _) = run_script(vm, &script, Duration::from_secs(20));
    assert_eq!(reason, ExitReason::GuestReset);
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "smp\n");
    std::fs::remove_file(console).unwrap();
}

#[test]
fn ctrl_alt_del_reaches_a_listening_guest_keyboard_driver() {
    if !kvm_or_skip() {
        return;
    }
    const READY: u64 = 0x70000;
    let console = scratch("console");
    let vm = new_vm(&console);
    let button = vm.ctrl_alt_del();
    assert!(
        !button.press(),
        "no keyboard driver listens before the guest enables it"
    );
    let mut script = vec![
        // What Linux's i8042 driver does: self test, then enable the keyboard interrupt.
        Op::Out8(0x64, 0xaa),
        Op::PollIn8(0x60, 0x55),
        Op::Out8(0x64, 0x60),
        Op::Out8(0x60, 0x05),
        Op::Write32(READY, 1),
        // Ctrl, Alt, Del (scan code set 2) arrive on the data port.
        Op::PollIn8(0x64, 0x15),
        Op::PollIn8(0x60, 0x14),
        Op::PollIn8(0x60, 0x11),
        Op::PollIn8(0x60, 0xe0),
        Op::PollIn8(0x60, 0x71),
    ];
    script.extend(serial_print("cad\n"));
    script.push(RESET);
    let mem = vm.memory().clone();
    let host = std::thread::spawn(move || {
        use vm_memory::{Bytes, GuestAddress};
        while mem.read_obj::<u32>(GuestAddress(READY)).unwrap() != 1 {
            std::thread::sleep(Duration::from_millis(1));
        }
        button.press()
    });
    let (reason, _) = run_script(vm, &script, Duration::from_secs(20));
    assert!(host.join().unwrap());
    assert_eq!(reason, ExitReason::GuestReset);
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "cad\n");
    std::fs::remove_file(console).unwrap();
}

/// CPUID leaf 1 (ebx, ecx) as the guest reads it with the CPUID instruction.
fn guest_leaf1(template: Option<CpuTemplate>) -> (u32, u32) {
    use vm_memory::{Bytes, GuestAddress};
    const OUT: u64 = 0x70000;
    let console = scratch("console");
    let vm = new_vm_full(&console, 1, template);
    let mem = vm.memory().clone();
    let (reason, _) = run_script(vm, &[Op::Cpuid(OUT, 1), RESET], Duration::from_secs(20));
    assert_eq!(reason, ExitReason::GuestReset);
    std::fs::remove_file(console).unwrap();
    let reg = |i: u64| mem.read_obj::<u32>(GuestAddress(OUT + 4 * i)).unwrap();
    (reg(1), reg(2))
}

/// Every entry of the CPUID the VMM hands KVM for vCPU `index` of `vcpus`: (leaf, subleaf,
/// registers).
fn vmm_cpuid(template: Option<CpuTemplate>, vcpus: u8, index: u8) -> Vec<(u32, u32, [u32; 4])> {
    let console = scratch("console");
    let vm = new_vm_full(&console, vcpus, template);
    let cpuid = vm.guest_cpuid(index).unwrap();
    std::fs::remove_file(console).unwrap();
    cpuid
        .as_slice()
        .iter()
        .map(|e| (e.function, e.index, [e.eax, e.ebx, e.ecx, e.edx]))
        .collect()
}

/// Leaf 1 as the VMM hands it to KVM for vCPU `index` (ebx, ecx).
fn vmm_leaf1(template: Option<CpuTemplate>, vcpus: u8, index: u8) -> (u32, u32) {
    let cpuid = vmm_cpuid(template, vcpus, index);
    let (_, _, [_, ebx, ecx, _]) = cpuid.into_iter().find(|e| e.0 == 1).unwrap();
    (ebx, ecx)
}

/// A fleet template: hide the hypervisor bit, force SSE3 (bit 0) off.
fn fleet_template() -> CpuTemplate {
    CpuTemplate::from_json(
        br#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [
            {"register": "ecx", "bitmap": "0b0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"}]}]}"#,
        "fleet",
    )
    .unwrap()
}

#[test]
fn vcpus_get_filtered_cpuid_and_the_cpu_template() {
    if !kvm_or_skip() {
        return;
    }
    let (ebx, ecx) = vmm_leaf1(None, 2, 1);
    assert_eq!(ebx >> 24, 1, "APIC id of vCPU 1");
    assert_eq!((ebx >> 16) & 0xff, 2, "two logical processors");
    assert_ne!(ecx & (1 << 31), 0, "the hypervisor bit is set");
    let (_, masked) = vmm_leaf1(Some(fleet_template()), 2, 1);
    assert_eq!(masked & ((1 << 31) | 1), 0);
    assert_eq!(
        masked & !((1 << 31) | 1),
        ecx & !((1 << 31) | 1),
        "other bits untouched"
    );
}

#[test]
fn the_cpuid_carries_the_host_brand_and_the_tsc_deadline_timer_where_the_host_has_one() {
    if !kvm_or_skip() {
        return;
    }
    let console = scratch("console");
    let vm = new_vm_full(&console, 1, None);
    let cpuid = vm.guest_cpuid(0).unwrap();
    std::fs::remove_file(console).unwrap();
    let leaf = |function: u32| {
        let e = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function)
            .unwrap_or_else(|| panic!("no CPUID leaf {function:#x}"));
        [e.eax, e.ebx, e.ecx, e.edx]
    };
    let brand: Vec<[u32; 4]> = (0x8000_0002..=0x8000_0004).map(leaf).collect();
    assert_eq!(brand, kindling_vmm::cpu::HostCpu::brand_of_this_cpu());
    assert_ne!(brand[0], [0; 4], "a brand string");
    let tsc_deadline = kindling_vmm::cpu::HostCpu::tsc_deadline_for_guests(
        kvm_ioctls::Kvm::new()
            .unwrap()
            .check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
    );
    assert_eq!(
        leaf(1)[2] & (1 << 24) != 0,
        tsc_deadline,
        "TSC-deadline bit"
    );
}

#[test]
fn the_cache_and_topology_leaves_describe_the_vm_not_the_host() {
    if !kvm_or_skip() {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let kvm_leaf = |function: u32| {
        let e = supported.as_slice().iter().find(|e| e.function == function);
        e.map(|e| [e.eax, e.ebx, e.ecx, e.edx])
    };
    for (vcpus, index) in [(1, 0), (3, 2)] {
        let cpuid = vmm_cpuid(None, vcpus, index);
        let leaf = |function: u32| cpuid.iter().find(|e| e.0 == function).map(|e| e.2);
        let others = u32::from(vcpus - 1);
        // Each cache's sharers: the last level shared by every vCPU, the others by none.
        let mut caches = 0;
        for &(function, _, [eax, ..]) in &cpuid {
            if (function == 4 || function == 0x8000_001d) && eax & 0x1f != 0 {
                let (level, sharing) = ((eax >> 5) & 7, (eax >> 14) & 0xfff);
                let expected = if level == 3 { others } else { 0 };
                assert_eq!(
                    sharing, expected,
                    "leaf {function:#x}, L{level}, {vcpus} vCPUs"
                );
                if function == 4 {
                    assert_eq!(eax >> 26, others, "cores per package");
                }
                caches += 1;
            }
        }
        let amd = leaf(0).is_some_and(|l| l[1] == u32::from_le_bytes(*b"Auth"));
        if amd {
            assert_eq!(
                leaf(0x8000_0008).unwrap()[2] & 0xff,
                others,
                "threads less one"
            );
            if let Some([eax, ebx, ..]) = leaf(0x8000_001e) {
                assert_eq!((eax, ebx & 0xffff), (u32::from(index), u32::from(index)));
            }
        }
        println!("{vcpus} vCPUs: {caches} cache descriptions checked (AMD: {amd})");
        // The host's cache and TLB leaves, where it has them.
        if let Some(host) = kindling_vmm::cpu::HostCpu::cache_tlb_of_this_cpu() {
            assert_eq!(
                [leaf(0x8000_0005).unwrap(), leaf(0x8000_0006).unwrap()],
                host
            );
        }
        // KVM's own leaves: "KVMKVMKVM" and the paravirtual features it offers.
        let signature = leaf(0x4000_0000).expect("the hypervisor signature leaf");
        let name: Vec<u8> = signature[1..]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&name, b"KVMKVMKVM\0\0\0");
        assert!(
            signature[0] >= 0x4000_0001,
            "max hypervisor leaf {:#x}",
            signature[0]
        );
        assert_eq!(leaf(0x4000_0001), kvm_leaf(0x4000_0001), "KVM's features");
    }
}

/// What the guest's CPUID instruction returns. Nested kvm_pvm runs CPL3 CPUID natively (the
/// host's own values), so there this test runs inside the nested-KVM harness, whose SVM
/// intercepts CPUID as hardware KVM does.
#[test]
fn the_guest_reads_the_cpuid_the_vmm_set() {
    if !kvm_or_skip() {
        return;
    }
    if NestedTest::new("the_guest_reads_the_cpuid_the_vmm_set").run_here_or_nested() {
        return;
    }
    let (_, masked) = guest_leaf1(Some(fleet_template()));
    assert_eq!(
        masked & 1,
        0,
        "the template cleared SSE3 (so KVM intercepts CPUID)"
    );
    assert_eq!(masked & (1 << 31), 0, "the template hid the hypervisor bit");
    let (ebx, ecx) = guest_leaf1(None);
    assert_eq!((ebx >> 16) & 0xff, 1, "one logical processor");
    assert_ne!(ecx & 1, 0, "without the template SSE3 stays");
    assert_ne!(ecx & (1 << 31), 0, "and the hypervisor bit is set");
    let tsc_deadline = kindling_vmm::cpu::HostCpu::tsc_deadline_for_guests(
        kvm_ioctls::Kvm::new()
            .unwrap()
            .check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
    );
    assert_eq!(ecx & (1 << 24) != 0, tsc_deadline, "the TSC-deadline bit");
}
