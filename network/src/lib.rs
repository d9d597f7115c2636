//! Outbound networking for function environments, as Lambda gives it: every environment
//! gets one IPv4 address on a point-to-point link to the host (a veth pair into a
//! sandbox's network namespace, a tap under a microVM's virtio-net), a default route
//! through the host, and the host's upstream DNS resolvers; the host NATs what it sends
//! and refuses everything else (see [`nft`]).
//!
//! Each environment leases one /30 of the server's pool ([`Network::lease`]): the host
//! end is its first address, the guest its second. A lease is a lock on a file under
//! [`LOCK_DIR`], so that servers running side by side never hand out the same block and a
//! crashed server's blocks come free by themselves; its host interface is `knet<block>`,
//! which vanishes with the environment (a veth when its namespace goes, a tap when the
//! last descriptor of it is closed). Links, addresses and routes go through rtnetlink.

mod nft;

use std::fs::{self, File, OpenOptions};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use nix::fcntl::{Flock, FlockArg};
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// Host interfaces of environments are `knet<block>`; the host's filter matches them by
/// this prefix.
pub const IFNAME_PREFIX: &str = "knet";
/// The environment's own interface, in the sandbox and in a microVM alike.
pub const GUEST_IFNAME: &str = "eth0";
/// The lock files of leased blocks (`<block>.lock`), shared by every server on the host.
pub const LOCK_DIR: &str = "/run/kindling-network";
/// The default pool: private, and rarely one a host routes itself.
pub const DEFAULT_POOL: &str = "10.200.0.0/16";
/// The init keys of [`Lease::init_json`] and [`Lease::cmdline`] that differ from one lease
/// to the next, or that a restored guest is given afresh ([`Lease::guest_network`]): what
/// a snapshot taken with one lease does not depend on.
pub const PER_LEASE_KEYS: [&str; 3] = ["net_address", "net_gateway", "nameservers"];
/// Each environment's block: the network, the host, the guest and the broadcast address.
const BLOCK_PREFIX: u8 = 30;

/// An IPv4 network, `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    fn mask(len: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
    }

    /// Whether the two networks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let mask = Self::mask(self.len.min(other.len));
        u32::from(self.addr) & mask == u32::from(other.addr) & mask
    }

    /// How many /30 blocks it holds.
    fn blocks(&self) -> u32 {
        1 << (BLOCK_PREFIX - self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    /// A network of /8 to /30 with no host bits set, such as `10.200.0.0/16`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not an IPv4 network such as {DEFAULT_POOL}");
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        if !(8..=BLOCK_PREFIX).contains(&len) {
            return Err(format!("`{s}`: the pool's prefix must be /8 to /30"));
        }
        let network = Ipv4Addr::from(u32::from(addr) & Self::mask(len));
        if network != addr {
            return Err(format!(
                "`{s}`: host bits are set (the network is {network}/{len})"
            ));
        }
        Ok(Cidr { addr, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// How the server networks its environments.
#[derive(Debug, Clone)]
pub struct NetworkOptions {
    /// The addresses environments get, one /30 each.
    pub pool: Cidr,
    /// The resolvers environments use; `None`: the host's upstream ones
    /// ([`host_resolvers`]).
    pub dns: Option<Vec<Ipv4Addr>>,
}

impl Default for NetworkOptions {
    fn default() -> Self {
        Self {
            pool: DEFAULT_POOL.parse().expect("a valid pool"),
            dns: None,
        }
    }
}

/// The host's outbound networking for environments, once set up. When the host cannot
/// give it (no `nft`, forwarding off and not allowed on, a pool that collides with a host
/// route), it holds the reason: environments that want a network fail to start with it,
/// the others run.
#[derive(Debug)]
pub struct Network {
    pool: Cidr,
    dns: Vec<Ipv4Addr>,
    ready: Result<(), String>,
}

impl Network {
    /// Sets up the host: IPv4 forwarding, the `inet kindling` nftables table (see
    /// [`nft`]), the pool checked against the host's routes, and the interfaces that dead
    /// servers left behind removed. Logs what it did, and the fix if it could not.
    pub async fn setup(options: NetworkOptions) -> Network {
        let dns = options.dns.clone().unwrap_or_else(|| {
            let found = host_resolvers();
            if found.is_empty() {
                tracing::warn!("no upstream DNS resolver in /etc/resolv.conf (only loopback stubs, or none): environments get none; pass --dns");
            }
            found
        });
        let ready = prepare(&options.pool).await.map_err(|e| format!("{e:#}"));
        match &ready {
            Ok(()) => tracing::info!(pool = %options.pool, ?dns, "outbound networking for environments"),
            Err(why) => tracing::error!("environments cannot have a network here: {why}; functions with network = \"none\" still run"),
        }
        Network {
            pool: options.pool,
            dns,
            ready,
        }
    }

    /// The resolvers environments are given.
    pub fn dns(&self) -> &[Ipv4Addr] {
        &self.dns
    }

    /// A free /30 of the pool, held until the lease is dropped.
    pub fn lease(&self) -> Result<Lease> {
        if let Err(why) = &self.ready {
            bail!("this host cannot give environments a network ({why}); set network = \"none\" for the function, or fix the host and restart");
        }
        fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
        for block in 0..self.pool.blocks() {
            if let Some(lock) = try_lock(block)? {
                let network = u32::from(self.pool.addr) + block * 4;
                return Ok(Lease {
                    block,
                    _lock: lock,
                    host: Ipv4Addr::from(network + 1),
                    guest: Ipv4Addr::from(network + 2),
                    dns: self.dns.clone(),
                });
            }
        }
        bail!(
            "every address block of the pool {} is leased: give a larger pool",
            self.pool
        )
    }
}

/// The host side of [`Network::setup`]; the error says what to fix.
async fn prepare(pool: &Cidr) -> Result<()> {
    enable_forwarding()?;
    nft::install(pool).await?;
    let handle = connect()?;
    remove_stale_links(&handle).await?;
    check_pool(&handle, pool).await
}

/// Turns on IPv4 forwarding if it is off (the host routes its environments' packets).
fn enable_forwarding() -> Result<()> {
    const FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
    let now = fs::read_to_string(FORWARD).with_context(|| format!("reading {FORWARD}"))?;
    if now.trim() != "1" {
        fs::write(FORWARD, "1").with_context(|| {
            format!("IPv4 forwarding is off and turning it on failed (writing {FORWARD}); run `sysctl -w net.ipv4.ip_forward=1` as root")
        })?;
        tracing::info!(
            "turned on IPv4 forwarding (net.ipv4.ip_forward=1) to route environments' packets"
        );
    }
    Ok(())
}

/// Removes `knet<block>` links whose block no server holds (left by one that died).
async fn remove_stale_links(handle: &Handle) -> Result<()> {
    for (index, name) in links(handle).await? {
        let Some(block) = name
            .strip_prefix(IFNAME_PREFIX)
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Held while the link goes, so that no new lease of the block races the removal.
        if let Some(_held) = try_lock(block)? {
            tracing::info!(link = %name, "removing a dead server's environment link");
            delete_link(handle, index, &name).await?;
        }
    }
    Ok(())
}

/// Refuses a pool that overlaps a route of the host's other than its environments'.
async fn check_pool(handle: &Handle, pool: &Cidr) -> Result<()> {
    let ours: Vec<u32> = links(handle)
        .await?
        .into_iter()
        .filter(|(_, name)| name.starts_with(IFNAME_PREFIX))
        .map(|(index, _)| index)
        .collect();
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(route) = routes.try_next().await.context("listing routes")? {
        let len = route.header.destination_prefix_length;
        let mut dest = None;
        let mut oif = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => dest = Some(*a),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        let (Some(addr), false) = (dest, len == 0) else {
            continue;
        };
        if oif.is_some_and(|i| ours.contains(&i)) {
            continue;
        }
        let route = Cidr { addr, len };
        if route.overlaps(pool) {
            bail!("the address pool {pool} overlaps the host's route to {route}: choose another with --network-pool");
        }
    }
    Ok(())
}

/// Every link of the host: index and name.
async fn links(handle: &Handle) -> Result<Vec<(u32, String)>> {
    let mut found = Vec::new();
    let mut dump = handle.link().get().execute();
    while let Some(link) = dump.try_next().await.context("listing links")? {
        if let Some(name) = link_name(&link) {
            found.push((link.header.index, name));
        }
    }
    Ok(found)
}

fn link_name(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

/// An rtnetlink handle in this process's network namespace.
fn connect() -> Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Locks block `block`'s file, or `None` if another lease holds it.
fn try_lock(block: u32) -> Result<Option<Flock<File>>> {
    let path = Path::new(LOCK_DIR).join(format!("{block}.lock"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(anyhow!("locking {}: {e}", path.display())),
    }
}

/// One environment's /30, held while it runs.
#[derive(Debug)]
pub struct Lease {
    block: u32,
    _lock: Flock<File>,
    /// The host's end, the guest's gateway.
    pub host: Ipv4Addr,
    /// The guest's address.
    pub guest: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
}

impl Lease {
    /// The host interface's name.
    pub fn ifname(&self) -> String {
        format!("{IFNAME_PREFIX}{}", self.block)
    }

    /// init's keys that configure the guest's side (init/README.md), for its JSON file.
    pub fn init_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut keys = serde_json::Map::new();
        for (key, value) in self.init_keys() {
            keys.insert(key.into(), value.into());
        }
        let dns: Vec<String> = self.dns.iter().map(ToString::to_string).collect();
        keys.insert("nameservers".into(), dns.into());
        keys
    }

    /// The same keys for the guest kernel's command line (`kindling.KEY=VALUE`).
    pub fn cmdline(&self) -> String {
        let dns: Vec<String> = self.dns.iter().map(ToString::to_string).collect();
        let mut words: Vec<String> = self
            .init_keys()
            .into_iter()
            .map(|(key, value)| format!("kindling.{key}={value}"))
            .collect();
        words.push(format!("kindling.nameservers={}", dns.join(",")));
        words.join(" ")
    }

    /// What the guest is told of its side of the link when it is restored from another
    /// guest's snapshot (SnapStart), which configured the interface with its own lease.
    pub fn guest_network(&self) -> kindling_wire::GuestNetwork {
        kindling_wire::GuestNetwork {
            interface: GUEST_IFNAME.to_string(),
            address: self.guest,
            prefix: BLOCK_PREFIX,
            gateway: self.host,
            nameservers: self.dns.clone(),
        }
    }

    fn init_keys(&self) -> [(&'static str, String); 3] {
        [
            ("net_interface", GUEST_IFNAME.to_string()),
            ("net_address", format!("{}/{BLOCK_PREFIX}", self.guest)),
            ("net_gateway", self.host.to_string()),
        ]
    }

    /// Removes the host interface if it is still there (a namespace is torn down a
    /// moment after its last process, and its veth with it): the block is free for the
    /// next lease at once.
    pub async fn remove_link(&self) -> Result<()> {
        remove_link(&connect()?, &self.ifname()).await
    }

    /// A veth pair: `knet<block>` here, its peer made right in the network namespace of
    /// process `pid` as [`GUEST_IFNAME`] (init brings it up there). Made there, not moved
    /// there: moving a device between namespaces waits for the kernel's network
    /// synchronisation (18–28 ms measured here, most of a networked sandbox's start), making
    /// it in place does not (~3 ms).
    pub async fn veth_into(&self, pid: u32) -> Result<()> {
        let handle = connect()?;
        let name = self.ifname();
        remove_link(&handle, &name).await?;
        let peer = LinkUnspec::new_with_name(GUEST_IFNAME)
            .setns_by_pid(pid)
            .build();
        handle
            .link()
            .add(
                LinkVeth::new(&name, GUEST_IFNAME)
                    .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("creating the veth pair {name} into the environment"))?;
        if let Err(e) = self.configure_host_end(&handle).await {
            // Deleting one end deletes both.
            if let Ok(index) = index_of(&handle, &name).await {
                let _ = handle.link().del(index).execute().await;
            }
            return Err(e);
        }
        Ok(())
    }

    /// A tap `knet<block>` with a virtio-net header, configured; it lives as long as a
    /// descriptor of it is open (the returned one, and the hypervisor's copies).
    pub async fn tap(&self) -> Result<OwnedFd> {
        let name = self.ifname();
        let handle = connect()?;
        remove_link(&handle, &name).await?;
        let tap = open_tap(&name)?;
        self.configure_host_end(&handle).await?;
        Ok(tap)
    }

    /// The host end's address, and up.
    async fn configure_host_end(&self, handle: &Handle) -> Result<()> {
        let name = self.ifname();
        let index = index_of(handle, &name).await?;
        handle
            .address()
            .add(index, IpAddr::V4(self.host), BLOCK_PREFIX)
            .execute()
            .await
            .with_context(|| format!("addressing {name}"))?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("bringing {name} up"))
    }
}

/// Deletes link `name` if there is one.
async fn remove_link(handle: &Handle, name: &str) -> Result<()> {
    if let Some((index, _)) = links(handle).await?.into_iter().find(|(_, n)| n == name) {
        delete_link(handle, index, name).await?;
    }
    Ok(())
}

/// Deletes link `index` (`name`); one gone since it was listed is not an error: a veth
/// goes with its peer's network namespace, when the last process of that dies (as a dead
/// server's environments do while the next server starts).
async fn delete_link(handle: &Handle, index: u32, name: &str) -> Result<()> {
    match handle.link().del(index).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
            tracing::debug!(link = %name, "the link went by itself");
            Ok(())
        }
        result => result.with_context(|| format!("removing {name}")),
    }
}

async fn index_of(handle: &Handle, name: &str) -> Result<u32> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .with_context(|| format!("finding {name}"))?;
    link.map(|l| l.header.index)
        .ok_or_else(|| anyhow!("no link {name}"))
}

/// Creates the tap `name` (no packet info, a `virtio_net_hdr` on every frame, as both
/// hypervisors' virtio-net expect) and returns its descriptor.
fn open_tap(name: &str) -> Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun (is the tun module loaded?)")?;
    // SAFETY: `ifreq` is plain integers and unions of them: all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        bail!("tap name {name} is too long");
    }
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    req.ifr_ifru.ifru_flags =
        libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)
            .context("tap flags do not fit a short")?;
    // SAFETY: TUNSETIFF reads and writes one `ifreq`, which outlives the call; the fd is
    // the tun device just opened.
    let ret = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut libc::ifreq,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("creating the tap {name}"));
    }
    Ok(file.into())
}

/// The host's upstream resolvers: the IPv4 `nameserver`s of `/etc/resolv.conf`, or, where
/// that names only a loopback stub (systemd-resolved's 127.0.0.53, which an environment
/// cannot reach), of systemd-resolved's list of upstream servers.
pub fn host_resolvers() -> Vec<Ipv4Addr> {
    ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"]
        .iter()
        .map(|path| nameservers(&fs::read_to_string(path).unwrap_or_default()))
        .find(|found| !found.is_empty())
        .unwrap_or_default()
}

/// The non-loopback IPv4 `nameserver` lines of a resolv.conf.
fn nameservers(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
        .filter(|addr| !addr.is_loopback() && !addr.is_unspecified())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_parse_and_overlap() {
        let pool: Cidr = "10.200.0.0/16".parse().unwrap();
        assert_eq!(pool.blocks(), 16384);
        assert!(pool.overlaps(&"10.0.0.0/8".parse().unwrap()));
        assert!(pool.overlaps(&Cidr {
            addr: Ipv4Addr::new(10, 200, 3, 4),
            len: 32
        }));
        assert!(!pool.overlaps(&"10.201.0.0/16".parse().unwrap()));
        assert!("10.200.0.1/16"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("host bits"));
        assert!("10.200.0.0/31".parse::<Cidr>().is_err());
        assert!("fd00::/8".parse::<Cidr>().is_err());
    }

    /// Block `block` of 10.200.0.0/16, its lock a file of `dir`'s.
    fn lease(dir: &Path, block: u32) -> Lease {
        let file = File::create(dir.join(format!("{block}.lock"))).unwrap();
        let network = u32::from(Ipv4Addr::new(10, 200, 0, 0)) + block * 4;
        Lease {
            block,
            _lock: Flock::lock(file, FlockArg::LockExclusiveNonblock).unwrap(),
            host: Ipv4Addr::from(network + 1),
            guest: Ipv4Addr::from(network + 2),
            dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
        }
    }

    /// The words of two leases' command lines differ in [`PER_LEASE_KEYS`] alone, and
    /// [`Lease::guest_network`] says what those words say.
    #[test]
    fn per_lease_keys_are_what_differs_between_leases() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (lease(dir.path(), 0), lease(dir.path(), 5));
        let per_lease = |word: &&str| {
            PER_LEASE_KEYS
                .iter()
                .any(|key| word.starts_with(&format!("kindling.{key}=")))
        };
        let (a_line, b_line) = (a.cmdline(), b.cmdline());
        let split = |line: &str| -> (Vec<String>, Vec<String>) {
            let (lease, shared): (Vec<&str>, Vec<&str>) =
                line.split(' ').partition(|w| per_lease(w));
            let own = |words: Vec<&str>| words.into_iter().map(String::from).collect();
            (own(lease), own(shared))
        };
        let ((a_own, a_shared), (b_own, b_shared)) = (split(&a_line), split(&b_line));
        assert_eq!(a_shared, b_shared);
        assert_eq!(a_shared, ["kindling.net_interface=eth0"]);
        assert_eq!(a_own.len(), PER_LEASE_KEYS.len());
        assert!(a_own.iter().zip(&b_own).any(|(x, y)| x != y));
        let net = b.guest_network();
        assert_eq!(
            b_own,
            [
                format!("kindling.net_address={}/{}", net.address, net.prefix),
                format!("kindling.net_gateway={}", net.gateway),
                "kindling.nameservers=192.0.2.53".to_string(),
            ]
        );
        assert_eq!(
            (net.interface.as_str(), net.address, net.gateway),
            (
                "eth0",
                Ipv4Addr::new(10, 200, 0, 22),
                Ipv4Addr::new(10, 200, 0, 21)
            )
        );
        assert_eq!(net.resolv_conf(), "nameserver 192.0.2.53\n");
    }

    /// A link that went since it was listed (a veth whose peer's namespace died) is
    /// removed already, not an error that leaves the server without a network.
    #[tokio::test]
    async fn deleting_a_link_that_went_by_itself_succeeds() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED (host cannot): creating links needs root");
            return;
        }
        let handle = connect().unwrap();
        let name = format!("kngone{}", std::process::id() % 100_000);
        let peer = format!("{name}p");
        handle
            .link()
            .add(LinkVeth::new(&name, &peer).build())
            .execute()
            .await
            .unwrap();
        let index = index_of(&handle, &name).await.unwrap();
        // Deleting the peer takes the pair.
        remove_link(&handle, &peer).await.unwrap();
        assert!(links(&handle)
            .await
            .unwrap()
            .iter()
            .all(|(i, _)| *i != index));
        delete_link(&handle, index, &name).await.unwrap();
    }

    #[test]
    fn loopback_stubs_are_not_resolvers() {
        let text = "# generated\nnameserver 127.0.0.53\nnameserver 10.1.2.3\nnameserver ::1\nsearch x\nnameserver 192.0.2.53\n";
        assert_eq!(
            nameservers(text),
            [Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(192, 0, 2, 53)]
        );
        assert!(nameservers("nameserver 127.0.0.53\n").is_empty());
    }
}
