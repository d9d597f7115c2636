//! Real KVM: a CPL3 guest drives a virtio-net device over a real tap, in a network namespace
//! of the test's own, and the host's network stack answers it: an ARP request gets its reply,
//! an ICMP echo request its echo reply. Addresses come from TEST-NET-2 (198.51.100.0/24);
//! nothing leaves the namespace.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use kindling_vmm::exit::ExitReason;
use kindling_vmm::virtio::net::{MacAddr, Net, Tap, NET_HDR_LEN};
use vm_memory::{Bytes, GuestAddress};

const RX: (u64, u64, u64) = (0x40000, 0x41000, 0x42000);
const TX: (u64, u64, u64) = (0x43000, 0x44000, 0x45000);
const RX_BUF: u64 = 0x50000;
const TX_BUF: u64 = 0x60000;
const RX_BUFFERS: u16 = 4;
const WRITE: u16 = 2;
const TAP: &str = "kvnet0";
const GUEST_MAC: [u8; 6] = [0x06, 0, 0xc6, 0x33, 0x64, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0, 0xc6, 0x33, 0x64, 0x01];
const GUEST_IP: [u8; 4] = [198, 51, 100, 2];
const HOST_IP: [u8; 4] = [198, 51, 100, 1];
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const PING_ID: [u8; 2] = [0x4b, 0x4c];
const PING_DATA: &[u8] = b"kindling virtio-net";

/// An Ethernet frame behind a zeroed virtio-net header, padded to Ethernet's 60 bytes.
fn frame(dst: [u8; 6], ethertype: [u8; 2], payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; NET_HDR_LEN];
    f.extend(dst);
    f.extend(GUEST_MAC);
    f.extend(ethertype);
    f.extend(payload);
    f.resize(f.len().max(NET_HDR_LEN + 60), 0);
    f
}

/// Who has HOST_IP? Tell GUEST_IP.
fn arp_request() -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend(GUEST_MAC);
    arp.extend(GUEST_IP);
    arp.extend([0; 6]);
    arp.extend(HOST_IP);
    frame([0xff; 6], ETHERTYPE_ARP, &arp)
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> [u8; 2] {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (!u16::try_from(sum).unwrap()).to_be_bytes()
}

/// An ICMP echo request from GUEST_IP to HOST_IP.
fn ping() -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend(PING_ID);
    icmp.extend([0, 1]);
    icmp.extend(PING_DATA);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum);
    let total = u16::try_from(20 + icmp.len()).unwrap().to_be_bytes();
    let mut ip = vec![0x45, 0, total[0], total[1], 0, 1, 0x40, 0, 64, 1, 0, 0];
    ip.extend(GUEST_IP);
    ip.extend(HOST_IP);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum);
    ip.extend(icmp);
    frame(HOST_MAC, ETHERTYPE_IPV4, &ip)
}

fn sh(cmd: &str) {
    let status = Command::new("sh").args(["-ec", cmd]).status().unwrap();
    assert!(status.success(), "{cmd}: {status}");
}

#[test]
fn the_host_network_stack_answers_arp_and_ping_from_a_cpl3_guest() {
    if !kvm_or_skip() {
        return;
    }
    // SAFETY: unshare(2) with CLONE_NEWNET moves only this thread (and what it starts: the
    // tap, `ip`, the vCPU threads) into a fresh network namespace; no memory is involved.
    let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(unshared, 0, "{}", std::io::Error::last_os_error());
    // IPv4 only, so that the first frames the guest receives are the answers (no IPv6
    // router solicitations or MLD reports when the tap comes up).
    for conf in ["all", "default"] {
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1").unwrap();
    }

    let console = scratch("console");
    let mut vm = new_vm(&console);
    let mac = MacAddr(GUEST_MAC);
    let net = Net::new("eth0", Tap::open(TAP).unwrap(), Some(mac)).unwrap();
    let base = vm.add_net(net).unwrap().base;
    sh(&format!(
        "ip link set {TAP} address {} && ip addr add 198.51.100.1/24 dev {TAP} && ip link set {TAP} up",
        MacAddr(HOST_MAC)
    ));

    // The driver's memory: four RX buffers and two TX frames, published by the script.
    let mem = vm.memory();
    for i in 0..RX_BUFFERS {
        write_desc(
            mem,
            RX.0,
            i,
            RX_BUF + 0x1000 * u64::from(i),
            0x1000,
            WRITE,
            0,
        );
    }
    write_avail(mem, RX.1, &[0, 1, 2, 3]);
    mem.write_obj(0u16, GuestAddress(RX.1 + 2)).unwrap();
    for (i, f) in (0u16..).zip([arp_request(), ping()]) {
        let addr = TX_BUF + 0x1000 * u64::from(i);
        mem.write_slice(&f, GuestAddress(addr)).unwrap();
        write_desc(mem, TX.0, i, addr, u32::try_from(f.len()).unwrap(), 0, 0);
    }
    write_avail(mem, TX.1, &[0, 1]);
    mem.write_obj(0u16, GuestAddress(TX.1 + 2)).unwrap();

    let mac_word = |at: usize| {
        let mut w = [0u8; 4];
        let n = (GUEST_MAC.len() - at).min(4);
        w[..n].copy_from_slice(&GUEST_MAC[at..at + n]);
        u32::from_le_bytes(w)
    };
    let mut script = virtio_negotiate(base, 1, (1 << 32) | (1 << 5));
    script.push(Op::Expect32(base + mmio::STATUS, 0xb)); // FEATURES_OK: VERSION_1 | MAC
    script.push(Op::Expect32(base + mmio::CONFIG, mac_word(0)));
    script.push(Op::Expect32(base + mmio::CONFIG + 4, mac_word(4)));
    script.extend(virtio_queue_setup(base, 0, 16, RX.0, RX.1, RX.2));
    script.extend(virtio_queue_setup(base, 1, 16, TX.0, TX.1, TX.2));
    script.push(Op::Write32(base + mmio::STATUS, 0xf));
    script.push(Op::Write32(RX.1, u32::from(RX_BUFFERS) << 16));
    script.push(Op::Write32(base + mmio::QUEUE_NOTIFY, 0));
    for n in 1..=2u32 {
        // One frame out, one answer in.
        script.push(Op::Write32(TX.1, n << 16));
        script.push(Op::Write32(base + mmio::QUEUE_NOTIFY, 1));
        script.push(Op::PollEq32(TX.2, n << 16));
        script.push(Op::PollEq32(RX.2, n << 16));
    }
    script.extend(serial_print("net ok\n"));
    script.push(RESET);

    let mem = vm.memory().clone();
    let (reason, _) = run_script(vm, &script, Duration::from_secs(30));
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "net ok\n");
    assert_eq!(reason, ExitReason::GuestReset);

    // What the guest received, in used-ring order.
    let received: Vec<Vec<u8>> = (0..2u64)
        .map(|i| {
            let id: u32 = mem.read_obj(GuestAddress(RX.2 + 4 + 8 * i)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(RX.2 + 8 + 8 * i)).unwrap();
            let mut buf = vec![0u8; len as usize];
            mem.read_slice(&mut buf, GuestAddress(RX_BUF + 0x1000 * u64::from(id)))
                .unwrap();
            buf
        })
        .collect();
    for f in &received {
        // No flags, no GSO, one buffer.
        assert_eq!(f[..NET_HDR_LEN], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(f[NET_HDR_LEN..NET_HDR_LEN + 6], GUEST_MAC, "to the guest");
        assert_eq!(
            f[NET_HDR_LEN + 6..NET_HDR_LEN + 12],
            HOST_MAC,
            "from the tap"
        );
    }
    let arp = &received[0][NET_HDR_LEN + 12..];
    assert_eq!(arp[..2], ETHERTYPE_ARP);
    assert_eq!(arp[8..10], [0, 2], "an ARP reply");
    assert_eq!(arp[10..16], HOST_MAC, "sender hardware address");
    assert_eq!(arp[16..20], HOST_IP, "sender protocol address");
    assert_eq!(arp[20..26], GUEST_MAC, "target hardware address");

    let ip = &received[1][NET_HDR_LEN + 12..];
    assert_eq!(ip[..2], ETHERTYPE_IPV4);
    let ip = &ip[2..];
    assert_eq!(
        (ip[9], &ip[12..16], &ip[16..20]),
        (1, &HOST_IP[..], &GUEST_IP[..])
    );
    let icmp = &ip[20..];
    assert_eq!(icmp[0], 0, "an echo reply");
    assert_eq!(icmp[4..6], PING_ID);
    assert_eq!(&icmp[8..8 + PING_DATA.len()], PING_DATA);
    std::fs::remove_file(console).unwrap();
}
