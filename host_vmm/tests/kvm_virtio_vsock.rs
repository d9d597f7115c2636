//! Real KVM: a CPL3 guest drives a virtio-vsock device; the VMM's event loop bridges it to
//! real Unix sockets in both directions (Firecracker's hybrid convention).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use common::*;
use kindling_vmm::exit::ExitReason;
use kindling_vmm::virtio::vsock::packet::{
    Header, HEADER_LEN, OP_REQUEST, OP_RESPONSE, OP_RW, TYPE_STREAM,
};
use vm_memory::{Bytes, GuestAddress};

const RX: (u64, u64, u64) = (0x40000, 0x41000, 0x42000);
const TX: (u64, u64, u64) = (0x43000, 0x44000, 0x45000);
const EV: (u64, u64, u64) = (0x46000, 0x47000, 0x48000);
const RX_BUF: u64 = 0x50000;
const TX_BUF: u64 = 0x60000;
const GUEST_CID: u64 = 42;
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Guest → host test thread: "connect now". Host → guest: "got the OK line".
const GO_CONNECT: u64 = 0x70000;
const HOST_DONE: u64 = 0x70004;

fn packet(op: u16, src_port: u32, dst_port: u32, payload: &[u8]) -> (Header, Vec<u8>) {
    let h = Header {
        src_cid: GUEST_CID,
        dst_cid: 2,
        src_port,
        dst_port,
        len: u32::try_from(payload.len()).unwrap(),
        type_: TYPE_STREAM,
        op,
        buf_alloc: 4096,
        ..Default::default()
    };
    (h, payload.to_vec())
}

/// `type` and `op` of an RX packet header, as the guest reads them in one 32-bit load.
fn type_op(op: u16) -> u32 {
    u32::from(TYPE_STREAM) | (u32::from(op) << 16)
}

#[test]
fn guest_and_host_exchange_over_vsock_both_ways() {
    if !kvm_or_skip() {
        return;
    }
    let console = scratch("console");
    let uds = scratch("vsock.sock");
    let listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let mut vm = new_vm(&console);
    let base = vm.add_vsock(GUEST_CID, &uds).unwrap().base;

    // The driver's memory: three RX buffers, and three TX packets published one by one.
    let mem = vm.memory();
    for i in 0..3u16 {
        write_desc(mem, RX.0, i, RX_BUF + 0x1000 * u64::from(i), 0x1000, 2, 0);
    }
    write_avail(mem, RX.1, &[0, 1, 2]);
    let tx = [
        packet(OP_REQUEST, 700, 1234, &[]),
        packet(OP_RW, 700, 1234, b"hi"),
        packet(OP_RESPONSE, 52, FIRST_HOST_PORT, &[]),
    ];
    for (i, (h, data)) in (0u16..).zip(&tx) {
        let addr = TX_BUF + 0x1000 * u64::from(i);
        mem.write_obj(*h, GuestAddress(addr)).unwrap();
        mem.write_slice(data, GuestAddress(addr + HEADER_LEN as u64))
            .unwrap();
        write_desc(
            mem,
            TX.0,
            i,
            addr,
            u32::try_from(HEADER_LEN + data.len()).unwrap(),
            0,
            0,
        );
    }
    write_avail(mem, TX.1, &[0, 1, 2]);
    mem.write_obj(0u16, GuestAddress(TX.1 + 2)).unwrap(); // nothing published yet

    let publish_tx = |n: u32| {
        [
            Op::Write32(TX.1, n << 16),
            Op::Write32(base + mmio::QUEUE_NOTIFY, 1),
        ]
    };
    let mut script = virtio_negotiate(base, 19, 1 << 32);
    script.push(Op::Expect32(
        base + mmio::CONFIG,
        u32::try_from(GUEST_CID).unwrap(),
    ));
    script.extend(virtio_queue_setup(base, 0, 16, RX.0, RX.1, RX.2));
    script.extend(virtio_queue_setup(base, 1, 16, TX.0, TX.1, TX.2));
    script.extend(virtio_queue_setup(base, 2, 16, EV.0, EV.1, EV.2));
    script.push(Op::Write32(base + mmio::STATUS, 0xf));
    // Guest → host: connect to port 1234, then send "hi"; expect "yo" back.
    script.extend(publish_tx(1));
    script.push(Op::PollEq32(RX.2, 1 << 16));
    script.push(Op::Expect32(RX_BUF + 28, type_op(OP_RESPONSE)));
    script.extend(publish_tx(2));
    script.push(Op::PollEq32(RX.2, 2 << 16));
    script.push(Op::Expect32(RX_BUF + 0x1000 + 28, type_op(OP_RW)));
    script.push(Op::Expect32(
        RX_BUF + 0x1000 + HEADER_LEN as u64,
        u32::from_le_bytes(*b"yo\0\0"),
    ));
    // Host → guest: tell the host to connect; its CONNECT 52 arrives as a REQUEST; accept it.
    script.push(Op::Write32(GO_CONNECT, 1));
    script.push(Op::PollEq32(RX.2, 3 << 16));
    script.push(Op::Expect32(RX_BUF + 0x2000 + 28, type_op(OP_REQUEST)));
    script.push(Op::Expect32(RX_BUF + 0x2000 + 20, 52)); // dst_port
    script.extend(publish_tx(3));
    script.extend(serial_print("vsock ok\n"));
    // Wait until the host has read its OK line.
    script.push(Op::PollEq32(HOST_DONE, 1));
    script.push(RESET);

    let uds_for_host = uds.clone();
    let mem = vm.memory().clone();
    let host = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        conn.write_all(b"yo").unwrap();

        while mem.read_obj::<u32>(GuestAddress(GO_CONNECT)).unwrap() != 1 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut client = UnixStream::connect(&uds_for_host).unwrap();
        client.write_all(b"CONNECT 52\n").unwrap();
        let mut line = [0u8; 32];
        let n = client.read(&mut line).unwrap();
        mem.write_obj(1u32, GuestAddress(HOST_DONE)).unwrap();
        String::from_utf8_lossy(&line[..n]).into_owned()
    });

    let (reason, _) = run_script(vm, &script, Duration::from_secs(30));
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "vsock ok\n");
    assert_eq!(reason, ExitReason::GuestReset);
    assert_eq!(host.join().unwrap(), format!("OK {FIRST_HOST_PORT}\n"));
    assert!(
        !uds.exists(),
        "the vsock socket is unlinked when the VM is gone"
    );
    std::fs::remove_file(console).unwrap();
    std::fs::remove_file(format!("{}_1234", uds.display())).unwrap();
}
