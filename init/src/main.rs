//! `init`: PID 1 of every Kindling guest, in a microVM and in the namespace sandbox.
//!
//! The boot runs in a fixed order (see `init/README.md`): configuration, pseudo
//! filesystems, kernel modules, `switch_root`, machine settings, the workload cgroup,
//! the capabilities trimmed to what is left to do ([`privileges`]), then the bootstrap
//! under [`supervisor`], and at the end [`shutdown`]. Any failure
//! before the bootstrap runs is one `init: error: ...` line, then the same shutdown
//! with status 1: never a hang and never a kernel panic from PID 1 exiting.

mod cgroup;
mod config;
mod console;
mod modules;
mod mounts;
mod network;
mod privileges;
mod root;
mod shutdown;
mod supervisor;
mod system;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cgroup::Workload;
use crate::config::{Config, Layer};
use crate::console::{say, uptime};
use crate::mounts::Mounts;
use crate::shutdown::{finish, Exit};
use crate::supervisor::Supervisor;

/// The JSON configuration baked into an image.
const DEFAULT_CONFIG: &str = "/etc/kindling/init.json";
/// Inode number of the initial PID namespace (the kernel's `PROC_PID_INIT_INO`).
const INITIAL_PID_NS_INO: u64 = 0xEFFF_FFFC;

/// Exit status of init itself failing (as opposed to the bootstrap's).
const FAILURE: i32 = 1;

fn main() {
    say!("userspace at {:.3} s", uptime());
    if nix::unistd::getpid().as_raw() != 1 {
        // Shutdown signals every process it can: never do that outside a guest.
        say!("error: init must run as PID 1 (in a guest or a new PID namespace)");
        std::process::exit(FAILURE);
    }
    let mut mounts = Mounts::default();
    let config_path = match config_path(std::env::args().skip(1)) {
        Ok(path) => path,
        Err(e) => std::process::exit(fail_early(&e, mounts)),
    };
    let mut config = match load_config(config_path.as_deref(), &mut mounts) {
        Ok(config) => config,
        Err(e) => std::process::exit(fail_early(&e, mounts)),
    };
    let mut cgroup = None;
    let code = boot_and_run(
        &mut config,
        config_path.as_deref(),
        &mut mounts,
        &mut cgroup,
    )
    .unwrap_or_else(|e| {
        say!("error: {e:#}");
        FAILURE
    });
    std::process::exit(finish(&exit_of(&config), mounts, cgroup, code))
}

/// `--config PATH` is init's only option; other words are what the kernel passes on
/// from its command line and are ignored.
fn config_path(mut args: impl Iterator<Item = String>) -> Result<Option<PathBuf>> {
    let mut path = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => match args.next() {
                Some(p) => path = Some(PathBuf::from(p)),
                None => bail!("--config needs a path"),
            },
            other if other.starts_with('-') => bail!("unknown option {other}"),
            _ => {}
        }
    }
    Ok(path)
}

/// Defaults, then `/proc/cmdline` (only without `--config`), then the JSON file (the
/// default one only if it exists; one named by `--config` must).
fn load_config(path: Option<&Path>, mounts: &mut Mounts) -> Result<Config> {
    mounts.mount_proc()?;
    let mut config = Config::default();
    if path.is_none() {
        let cmdline = fs::read_to_string("/proc/cmdline").context("read /proc/cmdline")?;
        config.apply(Layer::from_cmdline(&cmdline)?)?;
    }
    let file = path.unwrap_or(Path::new(DEFAULT_CONFIG));
    if let Some(layer) = read_layer(file, path.is_some())? {
        config.apply(layer)?;
    }
    Ok(config)
}

fn read_layer(file: &Path, required: bool) -> Result<Option<Layer>> {
    match fs::read_to_string(file) {
        Ok(text) => Ok(Some(Layer::from_json(&text, &file.display().to_string())?)),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", file.display())),
    }
}

fn boot_and_run(
    config: &mut Config,
    config_path: Option<&Path>,
    mounts: &mut Mounts,
    cgroup: &mut Option<Workload>,
) -> Result<i32> {
    mounts.mount_standard(config.tmp_size.as_mount_option())?;
    console::attach(&config.console)?;
    if let config::BootTimer::At(address) = config.boot_timer {
        system::signal_boot_timer(address)?;
    }
    modules::load_all(&config.modules)?;
    let wait = Duration::from_millis(config.root_wait_ms);
    if let Some(device) = config.root.clone() {
        root::switch_root(&device, &config.root_fstype, &config.root_options, wait)?;
        say!("switched root to {} at {:.3} s", device.display(), uptime());
        apply_root_config(config, config_path.unwrap_or(Path::new(DEFAULT_CONFIG)))?;
    }
    for entry in config.extra_mounts() {
        mounts.mount_extra(&entry, wait)?;
    }
    if !config.sandbox {
        system::route_ctrl_alt_del();
    }
    system::set_hostname(&config.hostname)?;
    system::loopback_up()?;
    network::configure(config)?;
    system::set_nofile(config.nofile)?;
    *cgroup = Workload::create(config)?;
    privileges::keep_only_what_is_left(config.sandbox)?;
    Supervisor::new(config, cgroup.as_ref())?.run()
}

/// The root disk's own copy of the JSON file, if it has one, overrides what the
/// initramfs said, except for the keys that have already acted.
fn apply_root_config(config: &mut Config, file: &Path) -> Result<()> {
    let Some(layer) = read_layer(file, false)? else {
        return Ok(());
    };
    let late = layer.root_stage_keys();
    if !late.is_empty() {
        bail!(
            "{} on the root disk sets {}, which act before switch_root: set them in the \
             initramfs or on the kernel command line",
            file.display(),
            late.join(", ")
        );
    }
    Ok(config.apply(layer)?)
}

/// A failure before the configuration is known: shut down by the defaults, except that
/// inside a PID namespace (the sandbox) reboot(2) would only kill init, so exit instead.
/// Returns the status to exit with, as [`finish`] does.
#[must_use = "init must exit with the returned status"]
fn fail_early(error: &anyhow::Error, mounts: Mounts) -> i32 {
    say!("error: {error:#}");
    let defaults = Config {
        sandbox: !in_initial_pid_namespace(),
        ..Config::default()
    };
    finish(&exit_of(&defaults), mounts, None, FAILURE)
}

fn in_initial_pid_namespace() -> bool {
    fs::metadata("/proc/self/ns/pid").map_or(true, |m| m.ino() == INITIAL_PID_NS_INO)
}

fn exit_of(config: &Config) -> Exit {
    Exit {
        shutdown: config.shutdown,
        sandbox: config.sandbox,
        grace: Duration::from_millis(config.grace_ms),
    }
}
