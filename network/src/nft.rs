//! The host's packet filter and NAT for environments: one nftables table, `inet
//! kindling`, whose rules match environments by their host interfaces' name
//! (`knet*`), so no rule is added or removed per environment and a dead server leaves
//! nothing that matters behind. Installing it is idempotent: the chains are flushed and
//! refilled, and the pool is added to the `pools` set (servers with other pools keep
//! theirs).
//!
//! From an environment:
//! - to the host itself (any of its addresses, any port: the Invoke API, the Runtime API,
//!   sshd, …): refused, except the answers to connections the host opened;
//! - to another environment, to link-local `169.254.0.0/16` (cloud metadata), to
//!   multicast and broadcast, and any IPv6: refused;
//! - a source address other than its own (`fib` reverse-path check): dropped;
//! - anything else: forwarded, with the host's address as the source (masquerade).
//!
//! Towards an environment only the answers to what it sent are forwarded: nothing inbound.

use anyhow::{bail, Context, Result};
use tokio::io::AsyncWriteExt;

use crate::{Cidr, IFNAME_PREFIX};

/// The table's name (family `inet`).
pub const TABLE: &str = "kindling";

/// The nft script that (re)installs the table for `pool`.
fn script(pool: &Cidr) -> String {
    let envs = format!("\"{IFNAME_PREFIX}*\"");
    format!(
        "table inet {TABLE} {{
  set pools {{ type ipv4_addr; flags interval; auto-merge; }}
  chain prerouting {{ type filter hook prerouting priority -150; policy accept; }}
  chain input {{ type filter hook input priority 0; policy accept; }}
  chain forward {{ type filter hook forward priority 0; policy accept; }}
  chain postrouting {{ type nat hook postrouting priority 100; policy accept; }}
}}
flush chain inet {TABLE} prerouting
flush chain inet {TABLE} input
flush chain inet {TABLE} forward
flush chain inet {TABLE} postrouting
add element inet {TABLE} pools {{ {pool} }}
add rule inet {TABLE} prerouting iifname {envs} fib saddr . iif oif missing drop
add rule inet {TABLE} prerouting iifname {envs} fib saddr type local drop
add rule inet {TABLE} input iifname {envs} ct state established,related accept
add rule inet {TABLE} input iifname {envs} reject with icmpx type admin-prohibited
add rule inet {TABLE} forward iifname {envs} meta nfproto ipv6 drop
add rule inet {TABLE} forward iifname {envs} oifname {envs} reject with icmpx type admin-prohibited
add rule inet {TABLE} forward iifname {envs} ip daddr {{ 169.254.0.0/16, 224.0.0.0/4, 255.255.255.255 }} reject with icmpx type admin-prohibited
add rule inet {TABLE} forward iifname {envs} accept
add rule inet {TABLE} forward oifname {envs} ct state established,related accept
add rule inet {TABLE} forward oifname {envs} drop
add rule inet {TABLE} postrouting ip saddr @pools oifname != {envs} masquerade
"
    )
}

/// Runs `nft -f -` with the table's script.
pub async fn install(pool: &Cidr) -> Result<()> {
    let mut nft = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft (install nftables: apt-get install nftables)")?;
    let mut stdin = nft.stdin.take().context("nft's stdin")?;
    stdin.write_all(script(pool).as_bytes()).await?;
    drop(stdin);
    let out = nft.wait_with_output().await.context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft refused the environments' filter and NAT ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_names_the_pool_and_the_interfaces() {
        let s = script(&"10.200.0.0/16".parse().unwrap());
        assert!(s.contains("add element inet kindling pools { 10.200.0.0/16 }"));
        assert!(s.contains("input iifname \"knet*\" reject"));
        assert!(s.contains("ip saddr @pools oifname != \"knet*\" masquerade"));
    }
}
