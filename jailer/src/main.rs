//! `kindling-jailer`: starts one program — kindling-vmm, or QEMU and its vsock daemon —
//! jailed the way Firecracker's jailer jails Firecracker, so that a guest that takes over
//! its VMM holds an unprivileged process in an empty room, not a root shell on the host.
//!
//! In order: the arguments are checked; with `--parent-pid`, the jailer makes itself die
//! with its parent; every inherited fd but 0–2 (and those named by `--keep-fd`) is closed; the chroot
//! `<chroot-base-dir>/<exec file name>/<id>/root` is made and the program hard-linked (or
//! copied) into it, unless it lies in a bound folder; the cgroup limits, if any, go to
//! `<cgroup mount>/<parent-cgroup>/<id>` (v2, or the v1 hierarchy of each controller). Then a child in a new PID namespace enters new mount,
//! IPC and network namespaces (or joins `--netns`), bind-mounts only the files it is given
//! (read-only, or read-write for a socket folder) at their own paths, gets a private
//! `/dev` holding only `kvm` (owned by the jail's user; nothing with `--no-kvm`), joins
//! the cgroup, pivots into the chroot, drops to `--uid`/`--gid` with no capability and
//! `no_new_privs`, installs the seccomp denylist the function's runtime runs under too
//! (`kindling_plumbing::seccomp`: Docker's default refusals; kindling-vmm adds its own
//! per-thread allowlists, QEMU its `-sandbox`), and execs the program with an empty
//! environment. The jailer itself
//! stays behind as the child's parent ([`relay`]): it forwards termination signals, ends
//! as the program ended, and removes the chroot and the cgroup.

mod cgroup;
mod jail;
mod relay;

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, ensure, Context};
use clap::Parser;
use kindling_plumbing::lifetime;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Starts a VMM in a chroot with new namespaces, a cgroup and no privileges"
)]
struct Cli {
    /// The VM's id; names its chroot and its cgroup. Letters, digits, `-` and `_`.
    #[arg(long)]
    id: String,
    /// The program to jail, by absolute path. A static program is linked into the
    /// chroot's root; one that lies in a `--bind` folder runs from there instead, so a
    /// dynamic program runs once its libraries are bound too (`--bind /usr --bind /lib --bind /lib64`).
    #[arg(long, value_name = "PATH")]
    exec_file: PathBuf,
    /// The user the program runs as (not 0).
    #[arg(long)]
    uid: u32,
    /// The group the program runs as (not 0); its only group.
    #[arg(long)]
    gid: u32,
    /// Where chroots are made: `<DIR>/<exec file name>/<id>/root`.
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    chroot_base_dir: PathBuf,
    /// A file or folder the program reads, bind-mounted read-only at the same path inside
    /// the chroot (a kernel, a drive, a config file). Repeatable.
    #[arg(long = "bind", value_name = "PATH")]
    binds: Vec<PathBuf>,
    /// A folder bind-mounted read-write at the same path (where the program makes its
    /// sockets, which the host reaches at the same path outside). Repeatable.
    #[arg(long = "bind-rw", value_name = "PATH")]
    binds_rw: Vec<PathBuf>,
    /// Give the jail no `/dev/kvm` (a program that runs no KVM guest: QEMU's TCG, a
    /// vsock daemon); its `/dev` is then empty.
    #[arg(long)]
    no_kvm: bool,
    /// Join this network namespace (such as /var/run/netns/NAME) instead of a new, empty one.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// An inherited descriptor the program keeps, at the same number (a tap the host made
    /// for the guest's network, which works from any network namespace). Repeatable.
    #[arg(long = "keep-fd", value_name = "FD", value_parser = clap::value_parser!(i32).range(3..))]
    keep_fds: Vec<i32>,
    /// Die with this process, the jailer's parent (SIGKILL, as its parent-death signal),
    /// and refuse to start if it is gone already. Set by the jailer itself, so that its
    /// caller can spawn it without a hook between fork and exec, and so without a fork.
    #[arg(long, value_name = "PID")]
    parent_pid: Option<u32>,
    /// A control file of the VM's cgroup and its value (v2: `memory.max=268435456`,
    /// `pids.max=64`; v1: `memory.limit_in_bytes=268435456`). Repeatable; without any, no
    /// cgroup is made.
    #[arg(long = "cgroup", value_name = "FILE=VALUE")]
    cgroups: Vec<String>,
    /// The cgroup, below the cgroup mount, under which the VM's cgroup `<id>` is made.
    #[arg(long, value_name = "PATH", default_value = "kindling-vmm")]
    parent_cgroup: PathBuf,
    /// Which cgroup file system holds the limits, as Firecracker's jailer: 2 (the unified
    /// hierarchy) or 1 (each file in the v1 hierarchy of its controller, a hybrid host's).
    #[arg(long, value_name = "1|2", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    cgroup_version: u8,
    /// The program's arguments, after `--`.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<OsString>,
}

/// What to jail, checked: every path absolute and free of `..`, ids that name one
/// directory each.
#[derive(Debug)]
pub struct Plan {
    pub id: String,
    pub exec_file: PathBuf,
    /// The program's name in the chroot's root, taken from `exec_file`.
    pub exec_name: String,
    /// Whether `exec_file` lies in a bound folder and runs from there, not linked in.
    pub exec_in_place: bool,
    pub uid: u32,
    pub gid: u32,
    /// `<chroot-base-dir>/<exec name>/<id>`, which the jailer removes when done.
    pub jail_dir: PathBuf,
    /// `<jail_dir>/root`.
    pub root: PathBuf,
    /// Bind mounts, `true` for read-write.
    pub binds: Vec<(PathBuf, bool)>,
    /// Whether the jail's `/dev` holds `kvm`.
    pub kvm: bool,
    pub netns: Option<PathBuf>,
    /// Inherited descriptors passed on to the program.
    pub keep_fds: Vec<i32>,
    pub parent_pid: Option<u32>,
    pub cgroup: Option<cgroup::Limits>,
    pub args: Vec<OsString>,
}

impl Plan {
    fn new(cli: Cli) -> anyhow::Result<Plan> {
        check_id(&cli.id)?;
        absolute("--exec-file", &cli.exec_file)?;
        let exec_name = cli
            .exec_file
            .file_name()
            .and_then(|n| n.to_str())
            .context("--exec-file names no file")?
            .to_string();
        ensure!(
            cli.exec_file.is_file(),
            "--exec-file {}: no such file",
            cli.exec_file.display()
        );
        ensure!(
            cli.uid != 0 && cli.gid != 0,
            "--uid and --gid must not be 0: the program would stay root"
        );
        absolute("--chroot-base-dir", &cli.chroot_base_dir)?;
        if let Some(netns) = &cli.netns {
            absolute("--netns", netns)?;
        }
        let binds: Vec<(PathBuf, bool)> = cli
            .binds
            .into_iter()
            .map(|p| (p, false))
            .chain(cli.binds_rw.into_iter().map(|p| (p, true)))
            .collect();
        for (path, _) in &binds {
            absolute("--bind", path)?;
            ensure!(path.exists(), "--bind {}: no such file", path.display());
            ensure!(
                !path.starts_with("/dev") && path != Path::new("/").join(&exec_name).as_path(),
                "--bind {}: /dev and /{exec_name} are the jail's own",
                path.display()
            );
            if let Some((outer, _)) = binds
                .iter()
                .find(|(other, _)| other != path && path.starts_with(other))
            {
                bail!(
                    "--bind {} lies inside --bind {}: give one or the other",
                    path.display(),
                    outer.display()
                );
            }
        }
        let cgroup = if cli.cgroups.is_empty() {
            None
        } else {
            let parent = &cli.parent_cgroup;
            ensure!(
                parent.is_relative()
                    && parent
                        .components()
                        .all(|c| matches!(c, Component::Normal(_))),
                "--parent-cgroup {}: a relative path without `..`",
                parent.display()
            );
            let version = if cli.cgroup_version == 1 {
                cgroup::Version::V1
            } else {
                cgroup::Version::V2
            };
            Some(cgroup::Limits::parse(
                version,
                parent.join(&cli.id),
                &cli.cgroups,
            )?)
        };
        let exec_in_place = binds
            .iter()
            .any(|(path, _)| cli.exec_file.starts_with(path));
        let jail_dir = cli.chroot_base_dir.join(&exec_name).join(&cli.id);
        Ok(Plan {
            root: jail_dir.join("root"),
            jail_dir,
            id: cli.id,
            exec_file: cli.exec_file,
            exec_name,
            exec_in_place,
            uid: cli.uid,
            gid: cli.gid,
            binds,
            kvm: !cli.no_kvm,
            netns: cli.netns,
            keep_fds: cli.keep_fds,
            parent_pid: cli.parent_pid,
            cgroup,
            args: cli.args,
        })
    }
}

/// An id is one path component of the chroot's and the cgroup's paths: never `/` or `..`.
fn check_id(id: &str) -> anyhow::Result<()> {
    ensure!(
        !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "--id {id:?}: 1 to 64 letters, digits, `-` or `_`"
    );
    Ok(())
}

fn absolute(flag: &str, path: &Path) -> anyhow::Result<()> {
    ensure!(
        path.is_absolute() && !path.components().any(|c| c == Component::ParentDir),
        "{flag} {}: an absolute path without `..`",
        path.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kindling-jailer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let plan = Plan::new(cli)?;
    if let Some(parent) = plan.parent_pid {
        lifetime::die_with_parent(parent).context("--parent-pid")?;
    }
    relay::close_inherited_fds(&plan.keep_fds)?;
    jail::prepare(&plan)?;
    let cgroup = match &plan.cgroup {
        Some(limits) => match limits.create() {
            Ok(cgroup) => Some(cgroup),
            Err(e) => {
                jail::remove(&plan);
                return Err(e);
            }
        },
        None => None,
    };
    match relay::fork_into_new_pid_namespace() {
        Ok(relay::Forked::Child) => {
            let joiners = cgroup.as_ref().map_or(&[][..], cgroup::Cgroup::joiners);
            // Only returns on failure; the relay reports the exit and cleans up.
            Err(jail::enter_and_exec(&plan, joiners))
        }
        Ok(relay::Forked::Parent(child)) => {
            let ended = relay::wait(child);
            jail::remove(&plan);
            if let Some(cgroup) = cgroup {
                cgroup.remove();
            }
            Ok(ended?.mirror())
        }
        Err(e) => {
            jail::remove(&plan);
            Err(e)
        }
    }
}
