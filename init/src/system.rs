//! Small pieces of machine state set once at boot: hostname, interfaces and the default
//! route, rlimits and the boot-timer write.

use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use crate::config::NoFile;
use crate::console::say;

/// Guest-physical address of Firecracker's boot timer device.
/// The value Firecracker's guests write there to say "userspace is up".
const BOOT_TIMER_MAGIC: u8 = 123;

/// Makes Ctrl-Alt-Del a SIGINT to init instead of an immediate reboot, so that a
/// hypervisor's "shut down" request (Firecracker's SendCtrlAltDel, a QEMU send-key) gets
/// the clean shutdown: SIGINT is forwarded to the bootstrap, which ends, and init stops.
/// Outside the initial PID namespace the kernel refuses (EINVAL); nothing to route there.
pub fn route_ctrl_alt_del() {
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        say!("Ctrl-Alt-Del stays a hard reboot: {e}");
    }
}

pub fn set_hostname(name: &str) -> Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    nix::unistd::sethostname(name).with_context(|| format!("sethostname {name}"))
}

/// Sets `RLIMIT_NOFILE`, which the bootstrap inherits. Without `CAP_SYS_RESOURCE` (a
/// sandbox on a locked-down host) the hard limit cannot be raised: then the current
/// hard limit is kept and said so, since the workload still runs correctly.
pub fn set_nofile(nofile: NoFile) -> Result<()> {
    let set = |soft, hard| {
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard)
            .with_context(|| format!("setrlimit NOFILE {soft}:{hard}"))
    };
    let (_, current_hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit NOFILE")?;
    match set(nofile.soft, nofile.hard) {
        Err(e) if nofile.hard > current_hard && e.downcast_ref() == Some(&Errno::EPERM) => {
            say!(
                "nofile: may not raise the hard limit to {}, keeping {current_hard}",
                nofile.hard
            );
            set(nofile.soft.min(current_hard), current_hard)
        }
        result => result,
    }
}

/// Gives `lo` 127.0.0.1/8 and brings it up.
pub fn loopback_up() -> Result<()> {
    interface_up("lo", Ipv4Addr::LOCALHOST, Ipv4Addr::new(255, 0, 0, 0)).context("loopback")
}

/// Gives interface `name` its address and netmask and brings it up, with the classic
/// `SIOCSIF*` ioctls (no netlink library needed for one interface).
pub fn interface_up(name: &str, addr: Ipv4Addr, netmask: Ipv4Addr) -> Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(addr)?;
    ioctl(&sock, libc::SIOCSIFADDR, &mut req)
        .with_context(|| format!("{name}: set address {addr}"))?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(netmask)?;
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut req)
        .with_context(|| format!("{name}: set netmask {netmask}"))?;
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut req).with_context(|| format!("{name}: get flags"))?;
    // SAFETY: SIOCGIFFLAGS just filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = libc::c_short::try_from(libc::IFF_UP | libc::IFF_RUNNING)
        .context("IFF_UP | IFF_RUNNING do not fit ifr_flags")?;
    req.ifr_ifru.ifru_flags = flags | up;
    ioctl(&sock, libc::SIOCSIFFLAGS, &mut req).with_context(|| format!("{name}: set up"))
}

/// Adds the default route through `gateway` (`SIOCADDRT`).
pub fn default_route(gateway: Ipv4Addr) -> Result<()> {
    let sock = inet_socket()?;
    // SAFETY: rtentry is plain old data (integers, sockaddrs and a null pointer); all
    // zeroes is a valid value of it.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED)?;
    route.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED)?;
    route.rt_gateway = sockaddr_in(gateway)?;
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: SIOCADDRT reads one struct rtentry, which outlives the call; its rt_dev is
    // null (the kernel picks the interface from the gateway).
    let rc = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCADDRT,
            &mut route as *mut libc::rtentry,
        )
    };
    Errno::result(rc)
        .map(drop)
        .with_context(|| format!("default route via {gateway}"))
}

fn inet_socket() -> Result<OwnedFd> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket(AF_INET)")
}

fn ifreq(name: &str) -> Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data (integers, arrays and a union of such); all zeroes
    // is a valid value of it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() {
        anyhow::bail!("`{name}` is not an interface name");
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    Ok(req)
}

fn sockaddr_in(addr: Ipv4Addr) -> Result<libc::sockaddr> {
    let mut sa = libc::sockaddr {
        sa_family: libc::sa_family_t::try_from(libc::AF_INET)
            .context("AF_INET does not fit sa_family_t")?,
        sa_data: [0; 14],
    };
    // As a sockaddr_in, the family is followed by the port (2 bytes), then the address
    // in network order.
    for (dst, src) in sa.sa_data[2..6].iter_mut().zip(addr.octets()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    Ok(sa)
}

fn ioctl(sock: &OwnedFd, request: libc::Ioctl, req: &mut libc::ifreq) -> Result<()> {
    // SAFETY: every SIOC[GS]IF* request used here reads or writes one struct ifreq, and
    // `req` is a valid, exclusively borrowed ifreq for the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut libc::ifreq) };
    Errno::result(rc).map(drop).map_err(Into::into)
}

/// Writes [`BOOT_TIMER_MAGIC`] to the boot-timer MMIO page at guest-physical `address`
/// through `/dev/mem`, which the VMM turns into a "guest reached userspace" log line with
/// the elapsed time.
pub fn signal_boot_timer(address: u64) -> Result<()> {
    let offset = libc::off_t::try_from(address)
        .with_context(|| format!("boot timer: address {address:#x}"))?;
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open("/dev/mem")
        .context("boot timer: open /dev/mem")?;
    let len = NonZeroUsize::new(4096).expect("non-zero");
    // SAFETY: a fresh shared mapping of one page of /dev/mem at the boot-timer address;
    // it aliases no Rust object, and is unmapped below before anything else uses it.
    let page = unsafe {
        mmap(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            &mem,
            offset,
        )
    }
    .with_context(|| format!("boot timer: mmap /dev/mem at {address:#x}"))?;
    // SAFETY: `page` points at a writable mapping of at least one byte; a volatile write
    // makes sure the store reaches the device.
    unsafe { page.cast::<u8>().write_volatile(BOOT_TIMER_MAGIC) };
    // SAFETY: `page` and `len` are exactly the mapping made above, used no more after.
    unsafe { munmap(page, len.get()) }.context("boot timer: munmap")
}
