//! Firecracker's JSON configuration, for the subset Kindling supports: `boot-source`,
//! `drives`, `machine-config` and `vsock`. The same structs are the bodies of the API's
//! `PUT` requests, so a config file and an API session describe a VM the same way.
//! Unknown fields are errors (a typo must not silently change the VM).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::boot::{BootSource, DEFAULT_BOOT_ARGS};
use crate::cpu_template::CpuTemplate;

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
    /// Accepted for compatibility when empty; there is no network device.
    #[serde(rename = "network-interfaces", default, skip_serializing)]
    pub network_interfaces: Vec<serde_json::Value>,
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

impl DriveConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.drive_id.is_empty()
            || !self
                .drive_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return err(format!(
                "invalid drive_id {:?}: use letters, digits and underscores",
                self.drive_id
            ));
        }
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
        if !self.network_interfaces.is_empty() {
            return err("network interfaces are not supported");
        }
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
              "network-interfaces": []
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
        check(
            base(r#", "network-interfaces": [{"iface_id": "eth0"}]"#),
            "network interfaces",
        );
        std::fs::remove_file(k).unwrap();
        std::fs::remove_file(d).unwrap();
    }
}
