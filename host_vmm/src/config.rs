//! Firecracker's JSON configuration, for the subset Kindling supports: `boot-source`,
//! `drives`, `machine-config`, `network-interfaces` and `vsock`. The same structs are the bodies of the API's
//! `PUT` requests, so a config file and an API session describe a VM the same way.
//! Unknown fields are errors (a typo must not silently change the VM).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::boot::{BootSource, DEFAULT_BOOT_ARGS};
use crate::cpu_template::CpuTemplate;
use crate::virtio::net::MacAddr;

/// Most vCPUs a VM may have (Firecracker's limit).
pub const MAX_VCPUS: u8 = 32;

/// `PUT /boot-source`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT /drives/{drive_id}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    pub drive_id: String,
    pub path_on_host: PathBuf,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// `Unsafe` (default) or `Writeback`; flush requests are honoured either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// Only `Sync` is implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
}

/// `PUT /machine-config`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Only `None` (the host's CPUID, filtered) is implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
        }
    }
}

/// `PUT /network-interfaces/{iface_id}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    pub iface_id: String,
    /// The tap, opened (as root: created, if missing) by name.
    pub host_dev_name: String,
    /// Kindling's addition: the tap `host_dev_name` as a descriptor the VMM inherited open,
    /// used instead of opening it by name (a jailed VMM, in a network namespace of its own
    /// and without privilege, can do neither). Refused unless it is that tap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_dev_fd: Option<i32>,
    /// Offered to the guest with `VIRTIO_NET_F_MAC`; without it the guest picks its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<MacAddr>,
    /// Rate limiters are not implemented: any value is refused by [`Self::validate`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

/// `PUT /vsock`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

/// A whole VM: Firecracker's `--config-file` layout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmConfig {
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSourceConfig>,
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// A custom CPU template file (Firecracker's `cpu-config`), loaded by [`Self::from_json`].
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<PathBuf>,
    /// The template in use: from `cpu-config` or `PUT /cpu-config`.
    #[serde(skip)]
    pub cpu_template: Option<CpuTemplate>,
    #[serde(
        rename = "network-interfaces",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
}

/// Why a configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

fn check_file(what: &str, path: &Path) -> Result<(), ConfigError> {
    if path.is_file() {
        Ok(())
    } else {
        err(format!("{what} {} is not a readable file", path.display()))
    }
}

impl BootSourceConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_file("kernel_image_path", &self.kernel_image_path)?;
        if let Some(initrd) = &self.initrd_path {
            check_file("initrd_path", initrd)?;
        }
        Ok(())
    }
}

/// An id the API also takes in its path (`drive_id`, `iface_id`).
fn check_id(what: &str, id: &str) -> Result<(), ConfigError> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return err(format!(
            "invalid {what} {id:?}: use letters, digits and underscores"
        ));
    }
    Ok(())
}

impl DriveConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_id("drive_id", &self.drive_id)?;
        check_file("path_on_host", &self.path_on_host)?;
        match self.cache_type.as_deref() {
            None | Some("Unsafe") | Some("Writeback") => {}
            Some(other) => return err(format!("unknown cache_type {other:?} (Unsafe, Writeback)")),
        }
        match self.io_engine.as_deref() {
            None | Some("Sync") => Ok(()),
            Some(other) => err(format!("io_engine {other:?} is not supported (Sync)")),
        }
    }
}

impl MachineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return err(format!("vcpu_count must be 1..={MAX_VCPUS}"));
        }
        if self.mem_size_mib < 16 {
            return err("mem_size_mib must be at least 16");
        }
        if self.smt {
            return err("smt is not supported");
        }
        if self.track_dirty_pages {
            return err("track_dirty_pages is not supported (no snapshots)");
        }
        match self.cpu_template.as_deref() {
            None | Some("None") => Ok(()),
            Some(other) => err(format!("cpu_template {other:?} is not supported (None)")),
        }
    }
}

impl NetworkInterfaceConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_id("iface_id", &self.iface_id)?;
        // What the kernel takes as an interface name (dev_valid_name): IFNAMSIZ - 1 bytes.
        let name = &self.host_dev_name;
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name == "."
            || name == ".."
            || name
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
        {
            return err(format!(
                "invalid host_dev_name {name:?}: an interface name of 1 to {} bytes",
                libc::IFNAMSIZ - 1
            ));
        }
        for (field, limiter) in [
            ("rx_rate_limiter", &self.rx_rate_limiter),
            ("tx_rate_limiter", &self.tx_rate_limiter),
        ] {
            if limiter.as_ref().is_some_and(|v| !v.is_null()) {
                return err(format!("{field} is not supported by kindling-vmm"));
            }
        }
        Ok(())
    }
}

/// Checks a VM's network interfaces, each on its own and together: no two share an
/// `iface_id`, a tap, a tap's descriptor or a guest MAC.
pub fn check_interfaces(interfaces: &[NetworkInterfaceConfig]) -> Result<(), ConfigError> {
    let (mut ids, mut taps, mut macs) = (HashSet::new(), HashSet::new(), HashSet::new());
    check_tap_fds(interfaces.iter().map(|i| i.host_dev_fd))?;
    for i in interfaces {
        i.validate()?;
        if !ids.insert(&i.iface_id) {
            return err(format!("iface_id {:?} is used twice", i.iface_id));
        }
        if !taps.insert(&i.host_dev_name) {
            return err(format!(
                "host_dev_name {:?} is used by two network interfaces",
                i.host_dev_name
            ));
        }
        if let Some(mac) = i.guest_mac {
            if !macs.insert(mac) {
                return err(format!("guest_mac {mac} is used by two network interfaces"));
            }
        }
    }
    Ok(())
}

/// Checks the inherited tap descriptors (`host_dev_fd`) of one VM: none of the standard
/// streams, no two interfaces on one.
pub fn check_tap_fds(fds: impl Iterator<Item = Option<i32>>) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for fd in fds.flatten() {
        if fd <= libc::STDERR_FILENO {
            return err(format!(
                "invalid host_dev_fd {fd}: 0, 1 and 2 are the standard streams"
            ));
        }
        if !seen.insert(fd) {
            return err(format!(
                "host_dev_fd {fd} is used by two network interfaces"
            ));
        }
    }
    Ok(())
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < 3 {
            return err("guest_cid must be 3 or more (0-2 are reserved)");
        }
        if self.uds_path.as_os_str().is_empty() {
            return err("uds_path must not be empty");
        }
        if self.uds_path.exists() {
            return err(format!(
                "uds_path {} already exists",
                self.uds_path.display()
            ));
        }
        Ok(())
    }
}

impl VmmConfig {
    /// Parses a config file's JSON and loads the CPU template it names.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let mut config: Self = serde_json::from_str(json)
            .map_err(|e| ConfigError(format!("invalid configuration: {e}")))?;
        if let Some(path) = &config.cpu_config {
            config.cpu_template = Some(CpuTemplate::load(path).map_err(ConfigError)?);
        }
        Ok(config)
    }

    /// Checks everything a VM start needs; nothing is changed on error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Some(boot) = &self.boot_source else {
            return err("boot-source is required to start the VM");
        };
        boot.validate()?;
        self.machine_config.validate()?;
        let mut ids = HashSet::new();
        for d in &self.drives {
            d.validate()?;
            if !ids.insert(&d.drive_id) {
                return err(format!("drive_id {:?} is used twice", d.drive_id));
            }
        }
        if self.drives.iter().filter(|d| d.is_root_device).count() > 1 {
            return err("only one drive may be the root device");
        }
        check_interfaces(&self.network_interfaces)?;
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        Ok(())
    }

    /// Drives in guest order: the root device first (`/dev/vda`), then the others as given.
    pub fn ordered_drives(&self) -> Vec<&DriveConfig> {
        let mut drives: Vec<&DriveConfig> = self.drives.iter().collect();
        drives.sort_by_key(|d| !d.is_root_device);
        drives
    }

    /// What to boot, with `root=` added for a root drive (as Firecracker does).
    pub fn boot(&self) -> Option<BootSource> {
        let boot = self.boot_source.as_ref()?;
        let mut args = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string());
        if let Some(root) = self.drives.iter().find(|d| d.is_root_device) {
            match &root.partuuid {
                Some(uuid) => args.push_str(&format!(" root=PARTUUID={uuid}")),
                None => args.push_str(" root=/dev/vda"),
            }
            args.push_str(if root.is_read_only { " ro" } else { " rw" });
        }
        Some(BootSource {
            kernel: boot.kernel_image_path.clone(),
            initrd: boot.initrd_path.clone(),
            boot_args: args,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel and a disk file private to one test.
    fn files(test: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir();
        let k = dir.join(format!("kv-cfg-kernel-{}-{test}", std::process::id()));
        let d = dir.join(format!("kv-cfg-disk-{}-{test}", std::process::id()));
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&d, b"d").unwrap();
        (k, d)
    }

    #[test]
    fn firecracker_config_file_parses_and_validates() {
        let (k, d) = files("good");
        let json = format!(
            r#"{{
              "boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 reboot=k"}},
              "drives": [
                {{"drive_id": "code", "path_on_host": "{d}", "is_root_device": false, "is_read_only": true}},
                {{"drive_id": "rootfs", "path_on_host": "{d}", "is_root_device": true, "is_read_only": false}}
              ],
              "machine-config": {{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}},
              "vsock": {{"guest_cid": 3, "uds_path": "/tmp/kv-cfg-nonexistent.sock"}},
              "network-interfaces": [
                {{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}},
                {{"iface_id": "eth1", "host_dev_name": "tap1", "rx_rate_limiter": null}}
              ]
            }}"#,
            k.display(),
            d = d.display()
        );
        let cfg = VmmConfig::from_json(&json).unwrap();
        cfg.validate().unwrap();
        let order: Vec<&str> = cfg
            .ordered_drives()
            .iter()
            .map(|d| d.drive_id.as_str())
            .collect();
        assert_eq!(order, ["rootfs", "code"]);
        assert_eq!(
            cfg.boot().unwrap().boot_args,
            "console=ttyS0 reboot=k root=/dev/vda rw"
        );
        assert_eq!(cfg.machine_config.vcpu_count, 2);
        let macs: Vec<_> = cfg
            .network_interfaces
            .iter()
            .map(|i| i.guest_mac.map(|m| m.to_string()))
            .collect();
        assert_eq!(macs, [Some("06:00:ac:10:00:02".into()), None]);
        std::fs::remove_file(k).unwrap();
        std::fs::remove_file(d).unwrap();
    }

    #[test]
    fn cpu_config_names_a_template_file() {
        let (k, t) = files("cpu");
        std::fs::write(
            &t,
            br#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "modifiers": []}]}"#,
        )
        .unwrap();
        let json = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "cpu-config": "{}"}}"#,
            k.display(),
            t.display()
        );
        let cfg = VmmConfig::from_json(&json).unwrap();
        let template = cfg.cpu_template.expect("the template was loaded");
        assert_eq!(template.cpuid_modifiers.len(), 1);
        assert_eq!(template.name, t.display().to_string());
        std::fs::write(&t, b"{").unwrap();
        assert!(VmmConfig::from_json(&json)
            .unwrap_err()
            .0
            .contains("invalid CPU template"));
        std::fs::remove_file(k).unwrap();
        std::fs::remove_file(t).unwrap();
    }

    #[test]
    fn bad_configs_get_clear_errors() {
        let (k, d) = files("bad");
        let base = |extra: &str| {
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{}"}}{extra}}}"#,
                k.display()
            )
        };
        let check = |json: String, needle: &str| {
            let e = VmmConfig::from_json(&json)
                .and_then(|c| c.validate())
                .unwrap_err();
            assert!(
                e.0.contains(needle),
                "{:?} does not mention {needle:?}",
                e.0
            );
        };
        check(base(r#", "logger": {}"#), "unknown field `logger`");
        check(
            base(r#", "machine-config": {"vcpu_count": 0, "mem_size_mib": 128}"#),
            "vcpu_count",
        );
        check(
            base(r#", "machine-config": {"vcpu_count": "2", "mem_size_mib": 128}"#),
            "invalid type",
        );
        check(
            base(
                r#", "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}"#,
            ),
            "cpu_template",
        );
        check(
            base(r#", "vsock": {"guest_cid": 2, "uds_path": "/tmp/x"}"#),
            "guest_cid",
        );
        check(
            base(&format!(
                r#", "drives": [{{"drive_id": "a", "path_on_host": "{0}", "is_root_device": true}}, {{"drive_id": "a", "path_on_host": "{0}", "is_root_device": false}}]"#,
                d.display()
            )),
            "used twice",
        );
        check(
            base(
                r#", "drives": [{"drive_id": "a", "path_on_host": "/nonexistent", "is_root_device": true}]"#,
            ),
            "not a readable file",
        );
        check(r#"{"drives": []}"#.into(), "boot-source is required");
        check(
            r#"{"boot-source": {"kernel_image_path": "/nonexistent"}}"#.into(),
            "kernel_image_path",
        );
        let net = |ifaces: &str| base(&format!(r#", "network-interfaces": [{ifaces}]"#));
        check(
            net(r#"{"iface_id": "eth0"}"#),
            "missing field `host_dev_name`",
        );
        check(
            net(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00"}"#),
            "invalid MAC address",
        );
        check(
            net(r#"{"iface_id": "eth/0", "host_dev_name": "tap0"}"#),
            "invalid iface_id",
        );
        for name in ["", "a-name-of-16-byte", "ta p", "tap/0", ".."] {
            check(
                net(&format!(
                    r#"{{"iface_id": "eth0", "host_dev_name": "{name}"}}"#
                )),
                "invalid host_dev_name",
            );
        }
        check(
            net(
                r#"{"iface_id": "eth0", "host_dev_name": "tap0", "tx_rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}"#,
            ),
            "tx_rate_limiter is not supported",
        );
        check(
            net(
                r#"{"iface_id": "eth0", "host_dev_name": "tap0"}, {"iface_id": "eth0", "host_dev_name": "tap1"}"#,
            ),
            "iface_id \"eth0\" is used twice",
        );
        check(
            net(
                r#"{"iface_id": "eth0", "host_dev_name": "tap0"}, {"iface_id": "eth1", "host_dev_name": "tap0"}"#,
            ),
            "used by two network interfaces",
        );
        check(
            net(
                r#"{"iface_id": "a", "host_dev_name": "t0", "guest_mac": "06:00:00:00:00:01"}, {"iface_id": "b", "host_dev_name": "t1", "guest_mac": "06:00:00:00:00:01"}"#,
            ),
            "guest_mac 06:00:00:00:00:01 is used by two",
        );
        check(
            net(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "host_dev_fd": 2}"#),
            "invalid host_dev_fd 2: 0, 1 and 2 are the standard streams",
        );
        check(
            net(
                r#"{"iface_id": "a", "host_dev_name": "t0", "host_dev_fd": 5}, {"iface_id": "b", "host_dev_name": "t1", "host_dev_fd": 5}"#,
            ),
            "host_dev_fd 5 is used by two network interfaces",
        );
        std::fs::remove_file(k).unwrap();
        std::fs::remove_file(d).unwrap();
    }
}
