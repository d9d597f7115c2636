//! init's configuration and where it comes from.
//!
//! Three layers, later ones overriding earlier ones key by key: the built-in defaults, the
//! kernel command line (`kindling.<key>=<value>`, read from `/proc/cmdline`) and a JSON
//! object (`/etc/kindling/init.json`, or the file named by `--config`). `env` is merged
//! variable by variable instead of replaced, so that the command line can add to what an
//! image bakes in. Every key is documented in `init/README.md`.
//!
//! A misspelt key must not boot a guest that silently ignores it, so unknown keys are
//! errors in both sources.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use kindling_wire::{RuntimeUser, ENV_RUNTIME_USER};
use serde::Deserialize;

/// The fully resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Block device to `switch_root` into; `None` keeps the current root.
    pub root: Option<PathBuf>,
    pub root_fstype: String,
    /// Mount options of the root device (`ro` by default: Lambda's root is read-only).
    pub root_options: String,
    /// How long to wait for the root device (and for non-optional `mounts` sources).
    pub root_wait_ms: u64,
    /// Device of the function code, mounted read-only (ext4) at `/var/task` when present.
    pub task: Option<PathBuf>,
    /// Further filesystems, mounted after `switch_root`.
    pub mounts: Vec<MountEntry>,
    pub modules: Vec<String>,
    /// Empty: leave the hostname alone.
    pub hostname: String,
    pub tmp_size: Size,
    pub bootstrap: PathBuf,
    pub bootstrap_args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Whom the function's runtime runs as (uid, gid); the bootstrap drops to it.
    pub user: u32,
    pub group: u32,
    pub restart: Restart,
    pub memory_limit: Option<Size>,
    pub pids_limit: Option<u64>,
    /// Name of the workload cgroup under `/sys/fs/cgroup`; empty: no cgroup.
    pub cgroup: String,
    pub nofile: NoFile,
    pub shutdown: Shutdown,
    pub grace_ms: u64,
    pub sandbox: bool,
    pub boot_timer: BootTimer,
    /// Empty: keep the stdout/stderr init was started with.
    pub console: String,
    /// The interface `net_address` goes on.
    pub net_interface: String,
    /// The guest's IPv4 address and prefix; `None`: no network beyond `lo`.
    pub net_address: Option<NetAddress>,
    /// The default route's next hop.
    pub net_gateway: Option<Ipv4Addr>,
    /// Written to `/etc/resolv.conf` when `net_address` is set.
    pub nameservers: Vec<Ipv4Addr>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            root: None,
            root_fstype: "ext4".into(),
            root_options: "ro".into(),
            root_wait_ms: 5000,
            task: None,
            mounts: Vec::new(),
            modules: Vec::new(),
            hostname: "localhost".into(),
            tmp_size: Size("512m".into()),
            bootstrap: "/var/runtime/kindling-bootstrap".into(),
            bootstrap_args: Vec::new(),
            env: BTreeMap::new(),
            user: RuntimeUser::LAMBDA.uid,
            group: RuntimeUser::LAMBDA.gid,
            restart: Restart::Never,
            memory_limit: None,
            pids_limit: None,
            cgroup: "workload".into(),
            nofile: NoFile {
                soft: 1024,
                hard: 65536,
            },
            shutdown: Shutdown::Reboot,
            grace_ms: 2000,
            sandbox: false,
            boot_timer: BootTimer::Off,
            console: "/dev/console".into(),
            net_interface: "eth0".into(),
            net_address: None,
            net_gateway: None,
            nameservers: Vec::new(),
        }
    }
}

/// One entry of `mounts`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountEntry {
    pub source: String,
    pub target: PathBuf,
    pub fstype: String,
    /// Comma-separated, as for mount(8): flags like `ro`, `nosuid`, the rest for the
    /// filesystem.
    #[serde(default)]
    pub options: String,
    /// Skip the entry when `source` does not exist (instead of waiting, then failing).
    #[serde(default)]
    pub optional: bool,
}

/// Where the function code's drive is mounted.
pub const TASK_DIR: &str = "/var/task";

/// When the bootstrap is started again after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    Never,
    OnFailure,
    Always,
}

/// What `reboot(2)` is asked for at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// `RB_POWER_OFF`: only halts the CPU in a microVM without ACPI.
    Poweroff,
    /// `RB_AUTOBOOT`: with `reboot=k` the VMM sees the reset and exits.
    Reboot,
}

/// A size as tmpfs and cgroups take it: bytes with an optional `k`, `m` or `g` suffix
/// (powers of 1024), or for tmpfs a percentage of RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Size(String);

/// An interface's IPv4 address with its prefix length, written `10.200.0.2/30`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetAddress {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl NetAddress {
    /// The netmask of the prefix.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(
            u32::MAX
                .checked_shl(32 - u32::from(self.prefix))
                .unwrap_or(0),
        )
    }
}

impl FromStr for NetAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.split_once('/')
            .and_then(|(addr, prefix)| Some((addr.parse().ok()?, prefix.parse().ok()?)))
            .filter(|&(_, prefix): &(Ipv4Addr, u8)| (1..=32).contains(&prefix))
            .map(|(addr, prefix)| Self { addr, prefix })
            .ok_or_else(|| {
                format!("`{s}` is not an IPv4 address with a prefix (example: 10.200.0.2/30)")
            })
    }
}

/// `RLIMIT_NOFILE` for the bootstrap, written `SOFT:HARD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoFile {
    pub soft: u64,
    pub hard: u64,
}

impl Size {
    /// The tmpfs `size=` option value.
    pub fn as_mount_option(&self) -> &str {
        &self.0
    }

    /// The size in bytes; `None` for a percentage.
    pub fn bytes(&self) -> Option<u64> {
        let text = self.as_mount_option();
        let (digits, unit) = match text.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() || c == '%' => (&text[..i], Some(c)),
            _ => (text, None),
        };
        let n: u64 = digits.parse().ok()?;
        let shift = match unit.map(|c| c.to_ascii_lowercase()) {
            None => 0,
            Some('k') => 10,
            Some('m') => 20,
            Some('g') => 30,
            _ => return None,
        };
        n.checked_mul(1 << shift)
    }
}

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let size = Size(s.to_string());
        let percent = s
            .strip_suffix('%')
            .is_some_and(|p| p.parse::<u8>().is_ok_and(|p| (1..=100).contains(&p)));
        if percent || size.bytes().is_some_and(|b| b > 0) {
            Ok(size)
        } else {
            Err(format!(
                "`{s}` is not a size (examples: 512m, 2g, 65536, 50%)"
            ))
        }
    }
}

/// Where init writes the boot timer's byte, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootTimer {
    #[default]
    Off,
    /// The guest-physical address of the boot-timer page.
    At(u64),
}

impl BootTimer {
    /// kindling-vmm's boot timer (and Firecracker's before it moved below 3 GiB).
    pub const KINDLING_VMM: u64 = 0xd000_0000;
    /// Firecracker's current boot timer (measured with v1.17).
    pub const FIRECRACKER: u64 = 0xc000_0000;
}

impl FromStr for BootTimer {
    type Err = String;
    /// A boolean (on: kindling-vmm's address), or the page's address in hex.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "1" | "true" | "yes" | "on" => return Ok(Self::At(Self::KINDLING_VMM)),
            "0" | "false" | "no" | "off" => return Ok(Self::Off),
            _ => {}
        }
        s.strip_prefix("0x")
            .and_then(|hex| u64::from_str_radix(&hex.replace('_', ""), 16).ok())
            .filter(|address| address % 4096 == 0)
            .map(Self::At)
            .ok_or_else(|| {
                format!(
                    "`{s}` is neither a boolean nor a page-aligned hex address \
                     ({:#x} for kindling-vmm, {:#x} for Firecracker)",
                    Self::KINDLING_VMM,
                    Self::FIRECRACKER
                )
            })
    }
}

impl<'de> Deserialize<'de> for BootTimer {
    /// JSON takes a boolean too, as before the address could be chosen.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Switch(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Switch(on) => Ok(if on {
                Self::At(Self::KINDLING_VMM)
            } else {
                Self::Off
            }),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl FromStr for Restart {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(Self::Never),
            "on-failure" => Ok(Self::OnFailure),
            "always" => Ok(Self::Always),
            _ => Err(format!("`{s}` is not one of never, on-failure, always")),
        }
    }
}

impl FromStr for Shutdown {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "poweroff" => Ok(Self::Poweroff),
            "reboot" => Ok(Self::Reboot),
            _ => Err(format!("`{s}` is not one of poweroff, reboot")),
        }
    }
}

impl FromStr for NoFile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parsed = s
            .split_once(':')
            .and_then(|(soft, hard)| Some((soft.parse().ok()?, hard.parse().ok()?)));
        match parsed {
            Some((soft, hard)) if soft <= hard => Ok(Self { soft, hard }),
            _ => Err(format!(
                "`{s}` is not SOFT:HARD with SOFT <= HARD (example: 1024:65536)"
            )),
        }
    }
}

/// Lets serde read the string-valued types through their `FromStr`, so the command line
/// and JSON accept exactly the same spellings.
macro_rules! deserialize_via_from_str {
    ($($ty:ty),*) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
deserialize_via_from_str!(Size, Restart, Shutdown, NoFile, NetAddress);

/// One source's settings: only the keys it names.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    root: Option<String>,
    root_fstype: Option<String>,
    root_options: Option<String>,
    root_wait_ms: Option<u64>,
    task: Option<String>,
    mounts: Option<Vec<MountEntry>>,
    modules: Option<Vec<String>>,
    hostname: Option<String>,
    tmp_size: Option<Size>,
    bootstrap: Option<PathBuf>,
    bootstrap_args: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    user: Option<u32>,
    group: Option<u32>,
    restart: Option<Restart>,
    memory_limit: Option<Size>,
    pids_limit: Option<u64>,
    cgroup: Option<String>,
    nofile: Option<NoFile>,
    shutdown: Option<Shutdown>,
    grace_ms: Option<u64>,
    sandbox: Option<bool>,
    boot_timer: Option<BootTimer>,
    console: Option<String>,
    net_interface: Option<String>,
    net_address: Option<NetAddress>,
    net_gateway: Option<Ipv4Addr>,
    nameservers: Option<Vec<Ipv4Addr>>,
}

/// A configuration error, phrased for one line on the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The prefix that marks init's parameters on the kernel command line.
const CMDLINE_PREFIX: &str = "kindling.";

impl Layer {
    /// Reads the `kindling.*` parameters of a kernel command line; other parameters
    /// belong to the kernel and are skipped.
    pub fn from_cmdline(cmdline: &str) -> Result<Self, ConfigError> {
        let mut layer = Layer::default();
        for param in split_cmdline(cmdline) {
            let Some(param) = param.strip_prefix(CMDLINE_PREFIX) else {
                continue;
            };
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            layer
                .set_from_cmdline(key, value)
                .map_err(|e| ConfigError(format!("kernel command line: kindling.{key}: {e}")))?;
        }
        Ok(layer)
    }

    /// Reads a JSON object; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|e| ConfigError(format!("{origin}: {e}")))
    }

    /// Keys that act before `switch_root`, which a file read from the new root is too
    /// late to change.
    pub fn root_stage_keys(&self) -> Vec<&'static str> {
        [
            ("root", self.root.is_some()),
            ("root_fstype", self.root_fstype.is_some()),
            ("root_options", self.root_options.is_some()),
            ("root_wait_ms", self.root_wait_ms.is_some()),
            ("modules", self.modules.is_some()),
            ("tmp_size", self.tmp_size.is_some()),
            ("boot_timer", self.boot_timer.is_some()),
            ("console", self.console.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }

    fn set_from_cmdline(&mut self, key: &str, value: &str) -> Result<(), String> {
        fn parse<T: FromStr<Err = E>, E: fmt::Display>(v: &str) -> Result<Option<T>, String> {
            v.parse().map(Some).map_err(|e| format!("{e}"))
        }
        fn number<N: FromStr>(v: &str) -> Result<Option<N>, String> {
            v.parse()
                .map(Some)
                .map_err(|_| format!("`{v}` is not a whole number"))
        }
        fn list(v: &str, sep: fn(char) -> bool) -> Option<Vec<String>> {
            Some(
                v.split(sep)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            )
        }
        fn boolean(v: &str) -> Result<Option<bool>, String> {
            match v {
                "" | "1" | "true" | "yes" | "on" => Ok(Some(true)),
                "0" | "false" | "no" | "off" => Ok(Some(false)),
                _ => Err(format!("`{v}` is not a boolean (true or false)")),
            }
        }
        match key {
            "root" => self.root = Some(value.into()),
            "root_fstype" => self.root_fstype = Some(value.into()),
            "root_options" => self.root_options = Some(value.into()),
            "root_wait_ms" => self.root_wait_ms = number(value)?,
            "task" => self.task = Some(value.into()),
            "mounts" => return Err("can only be set in the JSON file".into()),
            "modules" => self.modules = list(value, |c| c == ','),
            "hostname" => self.hostname = Some(value.into()),
            "tmp_size" => self.tmp_size = parse(value)?,
            "bootstrap" => self.bootstrap = Some(value.into()),
            "bootstrap_args" => self.bootstrap_args = list(value, char::is_whitespace),
            "env" => self.env = Some(parse_env(value)?),
            "user" => self.user = number(value)?,
            "group" => self.group = number(value)?,
            "restart" => self.restart = parse(value)?,
            "memory_limit" => self.memory_limit = parse(value)?,
            "pids_limit" => self.pids_limit = number(value)?,
            "cgroup" => self.cgroup = Some(value.into()),
            "nofile" => self.nofile = parse(value)?,
            "shutdown" => self.shutdown = parse(value)?,
            "grace_ms" => self.grace_ms = number(value)?,
            "sandbox" => self.sandbox = boolean(value)?,
            "boot_timer" => self.boot_timer = parse(value)?,
            "console" => self.console = Some(value.into()),
            "net_interface" => self.net_interface = Some(value.into()),
            "net_address" => self.net_address = parse(value)?,
            "net_gateway" => {
                self.net_gateway = Some(
                    value
                        .parse()
                        .map_err(|_| format!("`{value}` is not an IPv4 address"))?,
                )
            }
            "nameservers" => {
                self.nameservers = Some(
                    value
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| {
                            s.parse()
                                .map_err(|_| format!("`{s}` is not an IPv4 address"))
                        })
                        .collect::<Result<_, _>>()?,
                )
            }
            _ => return Err("unknown key".into()),
        }
        Ok(())
    }
}

/// `K1=V1,K2=V2` (the command line's form of `env`).
fn parse_env(value: &str) -> Result<BTreeMap<String, String>, String> {
    value
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("`{pair}` is not NAME=VALUE")),
        })
        .collect()
}

/// Splits a kernel command line the way the kernel does: on whitespace, except inside
/// double quotes, which are removed.
fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut params = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    params.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        params.push(current);
    }
    params
}

impl Config {
    /// Applies one layer on top of this configuration and checks the result.
    pub fn apply(&mut self, layer: Layer) -> Result<(), ConfigError> {
        let Layer {
            root,
            root_fstype,
            root_options,
            root_wait_ms,
            task,
            mounts,
            modules,
            hostname,
            tmp_size,
            bootstrap,
            bootstrap_args,
            env,
            user,
            group,
            restart,
            memory_limit,
            pids_limit,
            cgroup,
            nofile,
            shutdown,
            grace_ms,
            sandbox,
            boot_timer,
            console,
            net_interface,
            net_address,
            net_gateway,
            nameservers,
        } = layer;
        if let Some(root) = root {
            self.root = (!root.is_empty()).then(|| root.into());
        }
        set(&mut self.root_fstype, root_fstype);
        set(&mut self.root_options, root_options);
        set(&mut self.root_wait_ms, root_wait_ms);
        if let Some(task) = task {
            self.task = (!task.is_empty()).then(|| task.into());
        }
        set(&mut self.mounts, mounts);
        set(&mut self.modules, modules);
        set(&mut self.hostname, hostname);
        set(&mut self.tmp_size, tmp_size);
        set(&mut self.bootstrap, bootstrap);
        set(&mut self.bootstrap_args, bootstrap_args);
        self.env.extend(env.unwrap_or_default());
        set(&mut self.user, user);
        set(&mut self.group, group);
        set(&mut self.restart, restart);
        if memory_limit.is_some() {
            self.memory_limit = memory_limit;
        }
        if pids_limit.is_some() {
            self.pids_limit = pids_limit;
        }
        set(&mut self.cgroup, cgroup);
        set(&mut self.nofile, nofile);
        set(&mut self.shutdown, shutdown);
        set(&mut self.grace_ms, grace_ms);
        set(&mut self.sandbox, sandbox);
        set(&mut self.boot_timer, boot_timer);
        set(&mut self.console, console);
        set(&mut self.net_interface, net_interface);
        if net_address.is_some() {
            self.net_address = net_address;
        }
        if net_gateway.is_some() {
            self.net_gateway = net_gateway;
        }
        set(&mut self.nameservers, nameservers);
        self.validate()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        if !self.bootstrap.is_absolute() {
            return fail(format!(
                "bootstrap: `{}` is not an absolute path",
                self.bootstrap.display()
            ));
        }
        for (key, device) in [("root", &self.root), ("task", &self.task)] {
            if let Some(device) = device.as_ref().filter(|d| !d.is_absolute()) {
                return fail(format!(
                    "{key}: `{}` is not an absolute device path",
                    device.display()
                ));
            }
        }
        if let Some(bad) = self
            .mounts
            .iter()
            .find(|m| !m.target.is_absolute() || m.source.is_empty() || m.fstype.is_empty())
        {
            return fail(format!(
                "mounts: {} ({}) needs a source, an fstype and an absolute target",
                bad.target.display(),
                bad.source
            ));
        }
        if self
            .memory_limit
            .as_ref()
            .is_some_and(|m| m.bytes().is_none())
        {
            return fail("memory_limit: a percentage is not allowed here".into());
        }
        if self.cgroup.contains('/') || self.cgroup == "." || self.cgroup == ".." {
            return fail(format!(
                "cgroup: `{}` must be a single directory name",
                self.cgroup
            ));
        }
        if self.cgroup.is_empty() && (self.memory_limit.is_some() || self.pids_limit.is_some()) {
            return fail("memory_limit and pids_limit need a cgroup (cgroup is empty)".into());
        }
        if let Some(key) = self.env.keys().find(|k| k.contains('=') || k.is_empty()) {
            return fail(format!("env: `{key}` is not a variable name"));
        }
        Ok(())
    }
}

impl Config {
    /// The bootstrap's environment: `env`, and whom the runtime runs as.
    pub fn bootstrap_env(&self) -> BTreeMap<String, String> {
        let user = RuntimeUser {
            uid: self.user,
            gid: self.group,
        };
        let mut env = self.env.clone();
        env.insert(ENV_RUNTIME_USER.to_string(), user.to_string());
        env
    }

    /// `mounts`, then the function code's drive when `task` names one.
    pub fn extra_mounts(&self) -> Vec<MountEntry> {
        let task = self.task.iter().map(|device| MountEntry {
            source: device.display().to_string(),
            target: TASK_DIR.into(),
            fstype: "ext4".into(),
            options: "ro".into(),
            optional: true,
        });
        self.mounts.iter().cloned().chain(task).collect()
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *field = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(cmdline: &str, json: &str) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        config.apply(Layer::from_cmdline(cmdline)?)?;
        config.apply(Layer::from_json(json, "init.json")?)?;
        Ok(config)
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let c = Config::default();
        assert_eq!(c.root, None);
        assert_eq!(c.root_fstype, "ext4");
        assert_eq!(c.tmp_size.as_mount_option(), "512m");
        assert_eq!(
            c.bootstrap,
            PathBuf::from("/var/runtime/kindling-bootstrap")
        );
        assert_eq!(c.restart, Restart::Never);
        assert_eq!(c.shutdown, Shutdown::Reboot);
        assert_eq!(c.grace_ms, 2000);
        assert_eq!(c.console, "/dev/console");
        assert_eq!((c.nofile.soft, c.nofile.hard), (1024, 65536));
        assert!(!c.sandbox);
        assert_eq!(c.boot_timer, BootTimer::Off);
    }

    #[test]
    fn the_network_keys_read_the_same_from_the_command_line_and_json() {
        let cmdline = resolve(
            "kindling.net_address=10.200.0.2/30 kindling.net_gateway=10.200.0.1 \
             kindling.nameservers=192.0.2.53,198.51.100.53",
            "{}",
        )
        .unwrap();
        let json = resolve(
            "",
            r#"{"net_address": "10.200.0.2/30", "net_gateway": "10.200.0.1",
                "nameservers": ["192.0.2.53", "198.51.100.53"]}"#,
        )
        .unwrap();
        assert_eq!(cmdline, json);
        let address = cmdline.net_address.unwrap();
        assert_eq!(address.addr, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(address.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(cmdline.net_interface, "eth0");
        assert_eq!(cmdline.nameservers.len(), 2);
        assert_eq!(Config::default().net_address, None);
        assert!(resolve("kindling.net_address=10.200.0.2", "{}").is_err());
        assert!(resolve("kindling.nameservers=dns.example", "{}").is_err());
        assert!(resolve("kindling.net_gateway=::1", "{}").is_err());
    }

    #[test]
    fn the_boot_timer_is_a_switch_or_an_address() {
        let timer = |cmdline: &str, json: &str| resolve(cmdline, json).map(|c| c.boot_timer);
        let kindling_vmm = Ok(BootTimer::At(BootTimer::KINDLING_VMM));
        assert_eq!(timer("kindling.boot_timer", "{}"), kindling_vmm);
        assert_eq!(timer("kindling.boot_timer=1", "{}"), kindling_vmm);
        assert_eq!(timer("", r#"{"boot_timer": true}"#), kindling_vmm);
        assert_eq!(
            timer("kindling.boot_timer=0xc0000000", "{}"),
            Ok(BootTimer::At(BootTimer::FIRECRACKER))
        );
        assert_eq!(
            timer("", r#"{"boot_timer": "0xc000_0000"}"#),
            Ok(BootTimer::At(BootTimer::FIRECRACKER))
        );
        assert_eq!(
            timer("kindling.boot_timer=0", r#"{"boot_timer": "0xc0000000"}"#),
            Ok(BootTimer::At(BootTimer::FIRECRACKER)),
            "the file wins over the command line"
        );
        assert!(timer("kindling.boot_timer=0xc0000001", "{}")
            .unwrap_err()
            .0
            .contains("page-aligned"));
        assert!(timer("kindling.boot_timer=sometimes", "{}").is_err());
    }

    #[test]
    fn cmdline_keys_are_read_and_kernel_params_skipped() {
        let c = resolve(
            "console=ttyS0 reboot=k kindling.root=/dev/vda kindling.modules=virtio_mmio,vsock \
             kindling.hostname=fn-1 kindling.env=A=1,B=x=y kindling.restart=on-failure \
             kindling.sandbox kindling.boot_timer=0 kindling.memory_limit=128m \
             kindling.pids_limit=64 \"kindling.bootstrap_args=--port 9001\" panic=-1 \
             kindling.task=/dev/vdb kindling.root_options=ro,noatime",
            "{}",
        )
        .unwrap();
        assert_eq!(c.root, Some(PathBuf::from("/dev/vda")));
        assert_eq!(c.modules, ["virtio_mmio", "vsock"]);
        assert_eq!(c.hostname, "fn-1");
        assert_eq!(c.env["A"], "1");
        assert_eq!(c.env["B"], "x=y");
        assert_eq!(c.restart, Restart::OnFailure);
        assert!(c.sandbox);
        assert_eq!(c.boot_timer, BootTimer::Off);
        assert_eq!(c.memory_limit.as_ref().unwrap().bytes(), Some(128 << 20));
        assert_eq!(c.pids_limit, Some(64));
        assert_eq!(c.bootstrap_args, ["--port", "9001"]);
        assert_eq!(c.root_options, "ro,noatime");
        assert_eq!(c.extra_mounts()[0].target, PathBuf::from(TASK_DIR));
        assert_eq!(c.extra_mounts()[0].source, "/dev/vdb");
        assert!(c.extra_mounts()[0].optional);
    }

    #[test]
    fn mounts_come_from_json_only() {
        let c = resolve(
            "",
            r#"{"mounts": [{"source": "/dev/vdc", "target": "/data", "fstype": "ext4"}]}"#,
        )
        .unwrap();
        assert_eq!(c.extra_mounts().len(), 1);
        assert_eq!(c.mounts[0].options, "");
        assert!(!c.mounts[0].optional);
        let e = error("kindling.mounts=x", "{}");
        assert!(e.contains("can only be set in the JSON file"), "{e}");
        let e = error(
            "",
            r#"{"mounts": [{"source": "/dev/vdc", "target": "data", "fstype": "ext4"}]}"#,
        );
        assert!(
            e.contains("needs a source, an fstype and an absolute target"),
            "{e}"
        );
        let e = error(
            "",
            r#"{"mounts": [{"source": "a", "target": "/b", "fstype": "c", "mode": 1}]}"#,
        );
        assert!(e.contains("unknown field `mode`"), "{e}");
    }

    #[test]
    fn the_runtime_runs_as_lambdas_user_unless_told_otherwise() {
        let c = resolve("", "{}").unwrap();
        assert_eq!(c.bootstrap_env()["KINDLING_RUNTIME_USER"], "993:993");
        let c = resolve(
            "kindling.user=1000 kindling.group=100",
            r#"{"env": {"A": "1"}}"#,
        )
        .unwrap();
        let env = c.bootstrap_env();
        assert_eq!(env["KINDLING_RUNTIME_USER"], "1000:100");
        assert_eq!(env["A"], "1");
        let c = resolve("kindling.user=1000", r#"{"user": 5, "group": 6}"#).unwrap();
        assert_eq!(c.bootstrap_env()["KINDLING_RUNTIME_USER"], "5:6");
        assert!(resolve("kindling.user=nobody", "{}").is_err());
    }

    #[test]
    fn json_overrides_cmdline_and_merges_env() {
        let c = resolve(
            "kindling.hostname=a kindling.env=A=1,B=2 kindling.grace_ms=10",
            r#"{"hostname": "b", "env": {"B": "3", "C": "4"}, "shutdown": "poweroff",
                "bootstrap_args": ["x y"], "tmp_size": "50%", "nofile": "10:20"}"#,
        )
        .unwrap();
        assert_eq!(c.hostname, "b");
        assert_eq!(c.grace_ms, 10);
        assert_eq!(
            c.env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
            ["A=1", "B=3", "C=4"]
        );
        assert_eq!(c.shutdown, Shutdown::Poweroff);
        assert_eq!(c.bootstrap_args, ["x y"]);
        assert_eq!(c.tmp_size.as_mount_option(), "50%");
        assert_eq!((c.nofile.soft, c.nofile.hard), (10, 20));
    }

    #[test]
    fn empty_root_means_no_switch_root() {
        let c = resolve("kindling.root=/dev/vda", r#"{"root": ""}"#).unwrap();
        assert_eq!(c.root, None);
    }

    fn error(cmdline: &str, json: &str) -> String {
        resolve(cmdline, json).unwrap_err().0
    }

    #[test]
    fn unknown_keys_are_rejected_in_both_sources() {
        let e = error("kindling.rot=/dev/vda", "{}");
        assert_eq!(e, "kernel command line: kindling.rot: unknown key");
        let e = error("", r#"{"hostnme": "x"}"#);
        assert!(e.starts_with("init.json: unknown field `hostnme`"), "{e}");
    }

    #[test]
    fn bad_values_are_rejected_with_the_key_named() {
        for (cmdline, want) in [
            (
                "kindling.restart=sometimes",
                "kindling.restart: `sometimes` is not one of",
            ),
            (
                "kindling.shutdown=halt",
                "kindling.shutdown: `halt` is not one of",
            ),
            (
                "kindling.grace_ms=soon",
                "kindling.grace_ms: `soon` is not a whole number",
            ),
            (
                "kindling.tmp_size=lots",
                "kindling.tmp_size: `lots` is not a size",
            ),
            (
                "kindling.tmp_size=0",
                "kindling.tmp_size: `0` is not a size",
            ),
            (
                "kindling.sandbox=maybe",
                "kindling.sandbox: `maybe` is not a boolean",
            ),
            (
                "kindling.env=NOVALUE",
                "kindling.env: `NOVALUE` is not NAME=VALUE",
            ),
            (
                "kindling.nofile=9:1",
                "kindling.nofile: `9:1` is not SOFT:HARD",
            ),
        ] {
            let e = error(cmdline, "{}");
            assert!(e.contains(want), "{cmdline}: {e}");
        }
        for (json, want) in [
            (r#"{"restart": "sometimes"}"#, "`sometimes` is not one of"),
            (r#"{"grace_ms": "2s"}"#, "invalid type"),
            (r#"{"modules": "a,b"}"#, "invalid type"),
            (
                r#"{"bootstrap": "relative/path"}"#,
                "bootstrap: `relative/path` is not an absolute path",
            ),
            (
                r#"{"memory_limit": "50%"}"#,
                "memory_limit: a percentage is not allowed",
            ),
            (
                r#"{"cgroup": "a/b"}"#,
                "cgroup: `a/b` must be a single directory name",
            ),
            (r#"{"cgroup": "", "pids_limit": 5}"#, "need a cgroup"),
            ("[1, 2]", "invalid type"),
            ("{", "EOF"),
        ] {
            let e = error("", json);
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn root_stage_keys_are_reported() {
        let layer = Layer::from_json(
            r#"{"root": "/dev/vdb", "modules": [], "hostname": "h", "console": ""}"#,
            "f",
        )
        .unwrap();
        assert_eq!(layer.root_stage_keys(), ["root", "modules", "console"]);
    }

    #[test]
    fn sizes_convert_to_bytes() {
        assert_eq!("65536".parse::<Size>().unwrap().bytes(), Some(65536));
        assert_eq!("2k".parse::<Size>().unwrap().bytes(), Some(2048));
        assert_eq!("1G".parse::<Size>().unwrap().bytes(), Some(1 << 30));
        assert_eq!("50%".parse::<Size>().unwrap().bytes(), None);
        assert!("101%".parse::<Size>().is_err());
        assert!("99999999999999999999g".parse::<Size>().is_err());
    }
}
