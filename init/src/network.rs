//! The guest's network, when the launcher gives it one (`net_address`): the interface
//! addressed and up, the default route through the host, and `/etc/resolv.conf` naming
//! the host's upstream resolvers. The interface may appear a moment after init starts
//! (the sandbox's host moves its veth in once init runs), so init waits for it.

use std::fs;
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};

use kindling_wire::RESOLV_CONF_COPY;

use crate::config::Config;
use crate::console::say;
use crate::system;

/// How long the interface may take to appear.
const INTERFACE_PATIENCE: Duration = Duration::from_secs(10);
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Configures the network the configuration names; nothing without `net_address`.
pub fn configure(config: &Config) -> Result<()> {
    let Some(address) = config.net_address else {
        return Ok(());
    };
    let name = &config.net_interface;
    wait_for_interface(name)?;
    system::interface_up(name, address.addr, address.netmask())?;
    if let Some(gateway) = config.net_gateway {
        system::default_route(gateway)?;
    }
    let text: String = config
        .nameservers
        .iter()
        .map(|ns| format!("nameserver {ns}\n"))
        .collect();
    place_resolv_conf(&text)?;
    say!(
        "network: {name} {}/{} via {}",
        address.addr,
        address.prefix,
        config
            .net_gateway
            .map_or("(no gateway)".to_string(), |g| g.to_string())
    );
    Ok(())
}

fn wait_for_interface(name: &str) -> Result<()> {
    let deadline = Instant::now() + INTERFACE_PATIENCE;
    while nix::net::if_::if_nametoindex(name).is_err() {
        if Instant::now() > deadline {
            bail!("network: no interface {name} after {INTERFACE_PATIENCE:?}");
        }
        sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Puts `text` where `/etc/resolv.conf` leads: a link into `/run` (the images' own,
/// systemd-resolved's on a host) gets its target written; a file is covered by a
/// read-only bind mount of a copy (the root is read-only).
fn place_resolv_conf(text: &str) -> Result<()> {
    let etc = Path::new(RESOLV_CONF);
    let meta = match fs::symlink_metadata(etc) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!("network: {RESOLV_CONF} does not exist, and the root is read-only: the image must have it (a file, or a link into /run)")
        }
        Err(e) => return Err(e).context(RESOLV_CONF),
    };
    if meta.file_type().is_symlink() {
        let target = absolute(etc, &fs::read_link(etc).context(RESOLV_CONF)?);
        if !target.starts_with("/run") {
            bail!(
                "network: {RESOLV_CONF} links to {}, outside the writable /run",
                target.display()
            );
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        return fs::write(&target, text).with_context(|| format!("writing {}", target.display()));
    }
    fs::write(RESOLV_CONF_COPY, text).with_context(|| format!("writing {RESOLV_CONF_COPY}"))?;
    mount(
        Some(RESOLV_CONF_COPY),
        etc,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .with_context(|| format!("binding {RESOLV_CONF_COPY} on {RESOLV_CONF}"))?;
    mount(
        None::<&str>,
        etc,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .with_context(|| format!("making {RESOLV_CONF} read-only"))
}

/// A link's target as an absolute, `..`-free path (links are read relative to their folder).
fn absolute(link: &Path, target: &Path) -> PathBuf {
    let base = link.parent().unwrap_or(Path::new("/"));
    let mut path = PathBuf::from("/");
    for component in base.join(target).components() {
        match component {
            Component::ParentDir => {
                path.pop();
            }
            Component::Normal(part) => path.push(part),
            _ => {}
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_targets_resolve_against_their_folder() {
        let etc = Path::new("/etc/resolv.conf");
        assert_eq!(
            absolute(etc, Path::new("../run/resolv.conf")),
            Path::new("/run/resolv.conf")
        );
        assert_eq!(
            absolute(etc, Path::new("/run/systemd/resolve/stub-resolv.conf")),
            Path::new("/run/systemd/resolve/stub-resolv.conf")
        );
        assert_eq!(
            absolute(etc, Path::new("../../../run/x")),
            Path::new("/run/x")
        );
    }
}
