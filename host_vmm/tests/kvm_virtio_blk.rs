//! Real KVM: a CPL3 guest negotiates a virtio-blk device over virtio-mmio exits and completes
//! a polled block read from a real file.

mod common;

use std::time::Duration;

use common::*;
use kindling_vmm::exit::ExitReason;
use kindling_vmm::virtio::block::Block;
use vm_memory::{Bytes, GuestAddress};

const DESC: u64 = 0x40000;
const AVAIL: u64 = 0x41000;
const USED: u64 = 0x42000;
const HEADER: u64 = 0x50000;
const DATA: u64 = 0x51000;
const STATUS: u64 = 0x52000;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

fn disk(sectors: u8) -> std::path::PathBuf {
    let path = scratch("disk");
    let data: Vec<u8> = (0..sectors).flat_map(|s| [s; 512]).collect();
    std::fs::write(&path, data).unwrap();
    path
}

#[test]
fn guest_reads_a_sector_through_virtio_mmio() {
    if !kvm_or_skip() {
        return;
    }
    let console = scratch("console");
    let disk = disk(8);
    let mut vm = new_vm(&console);
    let slot = vm
        .add_virtio_device(Block::open(&disk, true, "data").unwrap())
        .unwrap();
    assert_eq!((slot.base, slot.irq), (0xd000_1000, 5));
    assert_eq!(vm.virtio_slots(), [(0xd000_1000, 5)]);

    // The driver's memory: an IN request for sector 7 into DATA.
    let mem = vm.memory();
    mem.write_obj(0u32, GuestAddress(HEADER)).unwrap(); // VIRTIO_BLK_T_IN
    mem.write_obj(7u64, GuestAddress(HEADER + 8)).unwrap();
    mem.write_obj(0xffff_ffffu32, GuestAddress(STATUS)).unwrap();
    write_desc(mem, DESC, 0, HEADER, 16, NEXT, 1);
    write_desc(mem, DESC, 1, DATA, 512, WRITE | NEXT, 2);
    write_desc(mem, DESC, 2, STATUS, 1, WRITE, 0);
    write_avail(mem, AVAIL, &[0]);

    let base = slot.base;
    let mut script = virtio_negotiate(base, 2, 1 << 32);
    script.push(Op::Expect32(base + mmio::STATUS, 0xb)); // FEATURES_OK accepted
    script.push(Op::Write32(base + mmio::QUEUE_SEL, 0));
    script.push(Op::Expect32(base + mmio::QUEUE_NUM_MAX, 256));
    script.extend(virtio_queue_setup(base, 0, 16, DESC, AVAIL, USED));
    script.push(Op::Write32(base + mmio::STATUS, 0xf)); // DRIVER_OK
    script.push(Op::Expect32(base + mmio::CONFIG, 8)); // capacity in sectors
    script.push(Op::Write32(base + mmio::QUEUE_NOTIFY, 0));
    script.push(Op::PollEq32(USED, 1 << 16)); // used.flags = 0, used.idx = 1
    script.push(Op::Expect32(USED + 8, 513)); // used len: data + status byte
    script.push(Op::Expect32(base + mmio::INTERRUPT_STATUS, 1));
    script.push(Op::Write32(base + mmio::INTERRUPT_ACK, 1));
    script.push(Op::Expect32(base + mmio::INTERRUPT_STATUS, 0));
    script.push(Op::Expect32(DATA, 0x0707_0707));
    script.push(Op::Expect32(DATA + 508, 0x0707_0707));
    script.push(Op::Expect32(STATUS, 0xffff_ff00)); // VIRTIO_BLK_S_OK
    script.extend(serial_print("blk ok\n"));
    script.push(RESET);

    let (reason, _) = run_script(vm, &script, Duration::from_secs(30));
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "blk ok\n");
    assert_eq!(reason, ExitReason::GuestReset);
    std::fs::remove_file(console).unwrap();
    std::fs::remove_file(disk).unwrap();
}

#[test]
fn features_the_device_never_offered_are_refused() {
    if !kvm_or_skip() {
        return;
    }
    let console = scratch("console");
    let disk = disk(1);
    let mut vm = new_vm(&console);
    let slot = vm
        .add_virtio_device(Block::open(&disk, false, "data").unwrap())
        .unwrap();
    let base = slot.base;
    // Bit 1 (VIRTIO_BLK_F_SIZE_MAX) is not offered: FEATURES_OK must not stick.
    let mut script = virtio_negotiate(base, 2, (1 << 32) | 2);
    script.push(Op::Expect32(base + mmio::STATUS, 3));
    script.push(RESET);
    let (reason, _) = run_script(vm, &script, Duration::from_secs(30));
    assert_eq!(reason, ExitReason::GuestReset);
    std::fs::remove_file(console).unwrap();
    std::fs::remove_file(disk).unwrap();
}
