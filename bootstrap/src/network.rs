//! Moving a restored guest onto its own network lease (SnapStart). Every clone of a snapshot
//! resumes with the interface, default route and neighbours of the guest that took it, while
//! the host gave this one another tap, address and gateway: on its first event the host
//! names them ([`kindling_wire::HEADER_NETWORK`]) and, before the runtime sees the event,
//! the interface gets the new address (the others removed), the default route goes through
//! the new gateway, the neighbour entries learnt before (the old host end's MAC) are
//! flushed, and `/etc/resolv.conf` is rewritten if the resolvers differ. All through
//! rtnetlink, which needs `CAP_NET_ADMIN`: the agent, root in its VM, keeps it for this
//! ([`kindling_plumbing::privileges::AGENT_IN_MICROVM`]). To the guest that took the snapshot the same
//! facts change nothing but its neighbour cache.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use futures::TryStreamExt;
use kindling_wire::{GuestNetwork, RESOLV_CONF_COPY};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Configures `net` on its interface; the error says which step failed.
pub async fn readdress(net: &GuestNetwork) -> Result<(), String> {
    if net.prefix > 32 {
        return Err(format!("prefix /{} is not an IPv4 prefix", net.prefix));
    }
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| format!("opening rtnetlink: {e}"))?;
    let connection = tokio::spawn(connection);
    let done = configure(&handle, net).await;
    connection.abort();
    done?;
    rewrite_resolv_conf(&net.resolv_conf())
}

async fn configure(handle: &Handle, net: &GuestNetwork) -> Result<(), String> {
    let name = &net.interface;
    let index = handle
        .link()
        .get()
        .match_name(name.clone())
        .execute()
        .try_next()
        .await
        .map_err(|e| format!("finding {name}: {e}"))?
        .map(|link| link.header.index)
        .ok_or_else(|| format!("no interface {name}"))?;
    // The new address first, so that the new gateway is on a connected subnet when the
    // default route moves onto it; `replace` keeps it if it is there already.
    handle
        .address()
        .add(index, IpAddr::V4(net.address), net.prefix)
        .replace()
        .execute()
        .await
        .map_err(|e| format!("adding {}/{} to {name}: {e}", net.address, net.prefix))?;
    handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(net.gateway)
                .output_interface(index)
                .build(),
        )
        .replace()
        .execute()
        .await
        .map_err(|e| format!("default route via {}: {e}", net.gateway))?;
    for stale in stale_addresses(handle, index, net).await? {
        handle
            .address()
            .del(stale)
            .execute()
            .await
            .map_err(|e| format!("removing an old address of {name}: {e}"))?;
    }
    flush_neighbours(handle, index).await
}

/// The IPv4 addresses of interface `index` other than `net`'s.
async fn stale_addresses(
    handle: &Handle,
    index: u32,
    net: &GuestNetwork,
) -> Result<Vec<AddressMessage>, String> {
    let mut stale = Vec::new();
    let mut dump = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = dump
        .try_next()
        .await
        .map_err(|e| format!("listing addresses: {e}"))?
    {
        let ours = msg.header.prefix_len == net.prefix
            && msg
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(a)) if *a == net.address));
        if msg.header.family == AddressFamily::Inet && !ours {
            stale.push(msg);
        }
    }
    Ok(stale)
}

/// Deletes interface `index`'s IPv4 neighbour entries: the snapshot's guest learnt its own
/// host end's MAC, which no tap of this clone has (an entry gone already is no error).
async fn flush_neighbours(handle: &Handle, index: u32) -> Result<(), String> {
    let mut dump = handle
        .neighbours()
        .get()
        .set_family(IpVersion::V4)
        .execute();
    let mut entries = Vec::new();
    while let Some(msg) = dump
        .try_next()
        .await
        .map_err(|e| format!("listing neighbours: {e}"))?
    {
        if msg.header.ifindex == index {
            entries.push(msg);
        }
    }
    for entry in entries {
        if let Err(e) = handle.neighbours().del(entry).execute().await {
            let gone = matches!(&e, rtnetlink::Error::NetlinkError(m)
                if m.raw_code() == -nix::libc::ENOENT);
            if !gone {
                return Err(format!("flushing neighbours: {e}"));
            }
        }
    }
    Ok(())
}

/// Writes `text` where init put the resolvers (see init's network module): through
/// `/etc/resolv.conf` when it links into `/run`, else into the copy init bound over it;
/// nothing when it says that already.
fn rewrite_resolv_conf(text: &str) -> Result<(), String> {
    let is_link = std::fs::symlink_metadata(RESOLV_CONF)
        .map(|m| m.file_type().is_symlink())
        .map_err(|e| format!("{RESOLV_CONF}: {e}"))?;
    let target = if is_link {
        Path::new(RESOLV_CONF)
    } else {
        Path::new(RESOLV_CONF_COPY)
    };
    match std::fs::read_to_string(target) {
        Ok(now) if now == text => return Ok(()),
        Err(e) if e.kind() != ErrorKind::NotFound => {
            return Err(format!("{}: {e}", target.display()))
        }
        _ => {}
    }
    std::fs::write(target, text).map_err(|e| format!("writing {}: {e}", target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourState,
    };
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
    use rtnetlink::{LinkUnspec, LinkVeth};

    async fn index_of(handle: &Handle, name: &str) -> u32 {
        let mut links = handle.link().get().match_name(name.into()).execute();
        links.try_next().await.unwrap().unwrap().header.index
    }

    /// The IPv4 addresses of `index`, with their prefixes.
    async fn addresses(handle: &Handle, index: u32) -> Vec<(Ipv4Addr, u8)> {
        let msgs: Vec<AddressMessage> = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .unwrap();
        msgs.iter()
            .flat_map(|m| {
                m.attributes.iter().filter_map(move |a| match a {
                    AddressAttribute::Local(IpAddr::V4(a)) => Some((*a, m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect()
    }

    /// The gateways of the default routes.
    async fn default_gateways(handle: &Handle) -> Vec<Ipv4Addr> {
        let routes: Vec<_> = handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .unwrap();
        routes
            .iter()
            .filter(|r| r.header.destination_prefix_length == 0)
            .flat_map(|r| {
                r.attributes.iter().filter_map(|a| match a {
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
                    _ => None,
                })
            })
            .collect()
    }

    async fn neighbours(handle: &Handle, index: u32) -> Vec<Ipv4Addr> {
        let entries: Vec<_> = handle
            .neighbours()
            .get()
            .set_family(IpVersion::V4)
            .execute()
            .try_collect()
            .await
            .unwrap();
        entries
            .iter()
            .filter(|n| n.header.ifindex == index)
            .flat_map(|n| {
                n.attributes.iter().filter_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => Some(*d),
                    _ => None,
                })
            })
            .collect()
    }

    /// A guest configured with the snapshot's lease (10.200.0.2/30 via 10.200.0.1, that
    /// host end's MAC learnt) is moved onto a clone's (10.200.0.6/30 via 10.200.0.5): only
    /// the new address is left, the default route goes through the new gateway, the old
    /// neighbour is gone; doing it again changes nothing. In a network namespace of its own,
    /// on a veth standing for the virtio-net.
    #[test]
    fn a_guest_moves_onto_its_own_lease() {
        std::thread::spawn(|| {
            // SAFETY: unshare(2) with CLONE_NEWNET moves only this thread (and what it
            // starts) into a new network namespace; it touches no memory of ours.
            if unsafe { nix::libc::unshare(nix::libc::CLONE_NEWNET) } != 0 {
                println!(
                    "SKIPPED (host cannot): no network namespace for the test (needs root): {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (connection, handle, _) = rtnetlink::new_connection().unwrap();
                tokio::spawn(connection);
                handle
                    .link()
                    .add(LinkVeth::new("eth0", "host0").build())
                    .execute()
                    .await
                    .unwrap();
                let index = index_of(&handle, "eth0").await;
                for name in ["eth0", "host0"] {
                    let i = index_of(&handle, name).await;
                    handle
                        .link()
                        .set(LinkUnspec::new_with_index(i).up().build())
                        .execute()
                        .await
                        .unwrap();
                }
                let old_gateway = Ipv4Addr::new(10, 200, 0, 1);
                handle
                    .address()
                    .add(index, IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2)), 30)
                    .execute()
                    .await
                    .unwrap();
                handle
                    .route()
                    .add(
                        RouteMessageBuilder::<Ipv4Addr>::new()
                            .gateway(old_gateway)
                            .build(),
                    )
                    .execute()
                    .await
                    .unwrap();
                handle
                    .neighbours()
                    .add(index, IpAddr::V4(old_gateway))
                    .link_layer_address(&[2, 0, 0, 0, 0, 1])
                    .state(NeighbourState::Permanent)
                    .execute()
                    .await
                    .unwrap();
                assert_eq!(neighbours(&handle, index).await, [old_gateway]);
                let net = GuestNetwork {
                    interface: "eth0".into(),
                    address: Ipv4Addr::new(10, 200, 0, 6),
                    prefix: 30,
                    gateway: Ipv4Addr::new(10, 200, 0, 5),
                    nameservers: Vec::new(),
                };
                for _ in 0..2 {
                    configure(&handle, &net).await.unwrap();
                    assert_eq!(addresses(&handle, index).await, [(net.address, 30)]);
                    assert_eq!(default_gateways(&handle).await, [net.gateway]);
                    assert!(neighbours(&handle, index).await.is_empty());
                }
                let missing = GuestNetwork {
                    interface: "eth9".into(),
                    ..net
                };
                let error = configure(&handle, &missing).await.unwrap_err();
                assert!(error.contains("eth9"), "{error}");
            });
        })
        .join()
        .unwrap();
    }
}
