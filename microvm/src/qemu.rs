//! The `qemu` backend: Debian's `qemu-system-x86_64 -M microvm`, with KVM where the host
//! can run a guest kernel and TCG elsewhere, and virtio-vsock from rust-vmm's
//! `vhost-device-vsock` daemon (one per VM), which speaks Firecracker's hybrid Unix-socket
//! protocol. vhost-user needs the guest memory shared with the daemon: a shared memfd.
//!
//! Both are started through `kindling-jailer`, as kindling-vmm is: each alone in a chroot
//! of its own, in new PID, mount, IPC and network namespaces, as the VM's unprivileged
//! user with no capability and `no_new_privs` from their first instruction (QEMU's own
//! `-run-with user=` cannot be used: its `-sandbox elevateprivileges=deny` forbids the
//! setuid that would follow). Each chroot holds, read-only, the host's `/usr` and
//! `/lib64` and `/lib` (both programs are dynamic: their libraries, QEMU's firmware), and for QEMU
//! the VM's kernel, initramfs and drives at their own paths; read-write only the VM's
//! socket folder, where both make their sockets. QEMU's serial console is its stdout,
//! copied into the capped console log; its own messages and the daemon's go to
//! `hypervisor.log`.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::Child;

use crate::machine::{self, Jail, Limits, VmSpec, VmUser};
use crate::{console, Backend, RunningVm};
use kindling_runtime_api::config::Hypervisor;
use kindling_runtime_api::environment::Freezer;

pub const QEMU: &str = "qemu-system-x86_64";
pub const VHOST_VSOCK: &str = "vhost-device-vsock";

/// How QEMU executes the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Why a QEMU VM cannot be snapshotted here. SnapStart would save a stopped VM with QMP
/// `migrate` to a `file:` URI and restore it with `-incoming defer`, `migrate-incoming`
/// and `cont`, but QEMU refuses to migrate a VM with a vhost-user vsock device (QEMU 10.0:
/// "State blocked by non-migratable device '…/vhost-user-vsock'", its blocked reasons
/// adding "vhost-user backend lacks VHOST_USER_PROTOCOL_F_LOG_SHMFD feature"), and that
/// device is how the guest reaches the host here (no `/dev/vhost-vsock`).
pub const NO_SNAPSHOTS: &str = "QEMU cannot migrate a VM with vhost-user-vsock, its only \
     vsock here (\"State blocked by non-migratable device '…/vhost-user-vsock'\")";

/// The host folders both programs need, bound read-only into their chroots (those the
/// host has): their libraries and loader, QEMU's firmware (`/usr/share/qemu`).
fn system_folders() -> Vec<(&'static Path, bool)> {
    ["/usr", "/lib", "/lib64"]
        .into_iter()
        .map(Path::new)
        .filter(|p| p.exists())
        .map(|p| (p, false))
        .collect()
}

#[derive(Debug)]
pub struct Qemu {
    pub accel: Accel,
    /// The static `kindling-jailer` executable, which starts QEMU and its vsock daemon.
    pub jailer: PathBuf,
}

#[async_trait]
impl Backend for Qemu {
    fn kind(&self) -> Hypervisor {
        Hypervisor::Qemu
    }

    fn name(&self) -> &'static str {
        match self.accel {
            Accel::Kvm => "qemu/kvm",
            Accel::Tcg => "qemu/tcg",
        }
    }

    fn snapshots(&self) -> Result<&std::path::Path, String> {
        Err(NO_SNAPSHOTS.into())
    }

    async fn boot(&self, spec: &VmSpec) -> anyhow::Result<Box<dyn RunningVm>> {
        let vhost_sock = spec.socket_dir.join("vhost-vsock.sock");
        let qmp_sock = spec.socket_dir.join("qmp.sock");
        let helper_log = machine::log_file(&spec.work_dir.join("hypervisor.log"))?;

        let daemon_program = machine::find_program(VHOST_VSOCK).context(
            "is it installed? (`cargo install vhost-device-vsock`, done by scripts/setup.sh)",
        )?;
        let system = system_folders();
        let daemon_jail = Jail {
            program: &daemon_program,
            user: spec.user,
            files: &system,
            kvm: false,
            keep_fd: None,
            limits: VHOST_VSOCK_LIMITS,
        };
        let mut daemon = machine::jailed(
            &self.jailer,
            spec,
            &daemon_jail,
            helper_log.try_clone()?,
            helper_log.try_clone()?,
        );
        daemon
            .arg("--guest-cid")
            .arg(spec.guest_cid.to_string())
            .arg("--socket")
            .arg(&vhost_sock)
            .arg("--uds-path")
            .arg(&spec.vsock_uds);
        let mut daemon = machine::spawn(&mut daemon, VHOST_VSOCK)?;
        machine::wait_for_path(
            &vhost_sock,
            &mut daemon,
            VHOST_VSOCK,
            Duration::from_secs(10),
        )
        .await?;

        let (console, capture) = console::capture(&spec.console_log, console::LOG_CAP)?;
        let user = match self.accel {
            Accel::Kvm => kvm_user(spec.user)?,
            Accel::Tcg => spec.user,
        };
        let program =
            machine::find_program(QEMU).context("is Debian's qemu-system-x86 installed?")?;
        let mut files = system;
        files.extend([(spec.kernel.as_path(), false), (&spec.initramfs, false)]);
        files.extend(spec.drives.iter().map(|d| (d.path.as_path(), !d.read_only)));
        let qemu_jail = Jail {
            program: &program,
            user,
            files: &files,
            kvm: self.accel == Accel::Kvm,
            // The host made and addressed the tap; QEMU only uses it (no privilege needed,
            // and its own network namespace stays empty).
            keep_fd: spec.tap.as_ref().map(|tap| tap.fd.as_fd()),
            limits: self.limits(spec),
        };
        let mut qemu = machine::jailed(&self.jailer, spec, &qemu_jail, console, helper_log);
        qemu.args(self.args(spec, &vhost_sock, &qmp_sock));
        let qemu = machine::spawn(&mut qemu, QEMU)?;
        Ok(Box::new(QemuVm {
            qemu,
            daemon,
            qmp: Arc::new(Qmp(qmp_sock)),
            console: capture,
        }))
    }
}

/// What the vsock daemon may use: it holds only its connections' buffers.
const VHOST_VSOCK_LIMITS: Limits = Limits {
    memory_mib: 64,
    pids: 32,
};

/// TCG's translated-code cache, fixed (QEMU's default grows up to 1 GiB) so that QEMU's
/// memory has a known bound for its cgroup.
const TCG_CODE_CACHE_MIB: u64 = 256;

/// What QEMU needs beside the guest's RAM and TCG's code cache: its own heap, device
/// buffers, libraries.
const QEMU_OVERHEAD_MIB: u64 = 256;

impl Qemu {
    /// QEMU's cgroup: the guest's RAM, the code cache, QEMU itself; its vCPU threads,
    /// and a block I/O thread pool of up to 64.
    fn limits(&self, spec: &VmSpec) -> Limits {
        let cache = match self.accel {
            Accel::Kvm => 0,
            Accel::Tcg => TCG_CODE_CACHE_MIB,
        };
        Limits {
            memory_mib: u64::from(spec.memory_mib) + cache + QEMU_OVERHEAD_MIB,
            pids: 96 + u32::from(spec.vcpus),
        }
    }

    /// QEMU's arguments.
    fn args(
        &self,
        spec: &VmSpec,
        vhost_sock: &std::path::Path,
        qmp_sock: &std::path::Path,
    ) -> Vec<String> {
        let mem = spec.memory_mib;
        let accel = match self.accel {
            Accel::Kvm => "kvm".to_string(),
            Accel::Tcg => format!("tcg,tb-size={TCG_CODE_CACHE_MIB}"),
        };
        let mut args: Vec<String> = [
            "-M",
            "microvm,acpi=off,memory-backend=mem",
            "-accel",
            &accel,
            "-m",
            &format!("{mem}M"),
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-smp",
            &spec.vcpus.to_string(),
            "-nodefaults",
            "-no-user-config",
            // QEMU's own seccomp filter: no obsolete syscalls, no setuid, no fork/exec, no
            // scheduler or resource changes, whatever a guest makes of a device's bug.
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            &spec.kernel.to_string_lossy(),
            "-initrd",
            &spec.initramfs.to_string_lossy(),
            "-append",
            &spec.cmdline,
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
            "-chardev",
            &format!("socket,id=vsock,path={}", vhost_sock.display()),
            "-device",
            "vhost-user-vsock-device,chardev=vsock",
            "-device",
            "virtio-rng-device",
            // A keyboard controller, so that a Ctrl-Alt-Del asks the guest to shut down.
            "-device",
            "i8042",
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp_sock.display()),
        ]
        .map(String::from)
        .to_vec();
        if let Some(tap) = &spec.tap {
            // The descriptor the jail passes on (`Jail::keep_fd`), at the same number.
            let fd = tap.fd.as_raw_fd();
            args.extend([
                "-netdev".to_string(),
                format!("tap,id=net0,fd={fd}"),
                "-device".to_string(),
                "virtio-net-device,netdev=net0".to_string(),
            ]);
        }
        for drive in &spec.drives {
            let ro = if drive.read_only { ",readonly=on" } else { "" };
            args.push("-drive".into());
            args.push(format!(
                "id={},file={},format=raw,if=none{ro}",
                drive.id,
                drive.path.display()
            ));
            args.push("-device".into());
            args.push(format!("virtio-blk-device,drive={}", drive.id));
        }
        args
    }
}

/// `user` in the group of `/dev/kvm`, which QEMU opens itself: an unprivileged QEMU on
/// KVM needs the device group-accessible, as udev makes it (`root:kvm 0660`).
fn kvm_user(user: VmUser) -> anyhow::Result<VmUser> {
    use std::os::unix::fs::MetadataExt;
    let kvm = std::fs::metadata("/dev/kvm").context("/dev/kvm")?;
    if kvm.mode() & 0o060 != 0o060 || kvm.gid() == 0 {
        anyhow::bail!(
            "QEMU runs unprivileged and opens /dev/kvm through its group, but /dev/kvm is \
             {:o} {}:{} (make it root:kvm 0660, as udev does)",
            kvm.mode() & 0o777,
            kvm.uid(),
            kvm.gid()
        );
    }
    Ok(VmUser {
        gid: kvm.gid(),
        ..user
    })
}

struct QemuVm {
    qemu: Child,
    daemon: Child,
    qmp: Arc<Qmp>,
    console: console::Capture,
}

/// QEMU's QMP socket (`-qmp unix:...,server=on,wait=off`), which takes one client at a
/// time: each command gets a connection of its own.
struct Qmp(PathBuf);

impl Qmp {
    /// Runs one command (a QMP `execute` object) and waits for its answer.
    async fn execute(&self, command: &str) -> io::Result<()> {
        let stream = UnixStream::connect(&self.0).await?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        lines.next_line().await?; // the greeting
        for command in [r#"{"execute":"qmp_capabilities"}"#, command] {
            write.write_all(command.as_bytes()).await?;
            write.write_all(b"\n").await?;
            // Events (`STOP`, `RESUME`, ...) may come before the command's answer.
            loop {
                let line = lines.next_line().await?.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "QMP closed the connection")
                })?;
                let answer: serde_json::Value = serde_json::from_str(&line)
                    .map_err(|e| io::Error::other(format!("QMP answered {line:?}: {e}")))?;
                if answer.get("return").is_some() {
                    break;
                }
                if let Some(error) = answer.get("error") {
                    return Err(io::Error::other(format!("QMP {command}: {error}")));
                }
            }
        }
        Ok(())
    }
}

/// QMP `stop` and `cont`: QEMU stops the vCPUs (and, for vhost-user devices such as the
/// vsock, their rings) and starts them again where they were.
#[async_trait]
impl Freezer for Qmp {
    async fn freeze(&self) -> io::Result<()> {
        self.execute(r#"{"execute":"stop"}"#).await
    }

    async fn thaw(&self) -> io::Result<()> {
        self.execute(r#"{"execute":"cont"}"#).await
    }
}

#[async_trait]
impl RunningVm for QemuVm {
    /// Both processes: without its vsock daemon the guest cannot reach the host again.
    fn is_running(&mut self) -> bool {
        matches!(self.qemu.try_wait(), Ok(None)) && matches!(self.daemon.try_wait(), Ok(None))
    }

    async fn request_shutdown(&mut self) -> io::Result<()> {
        let keys = r#"{"execute":"send-key","arguments":{"keys":[{"type":"qcode","data":"ctrl"},{"type":"qcode","data":"alt"},{"type":"qcode","data":"delete"}]}}"#;
        self.qmp.execute(keys).await
    }

    /// Ends with QEMU or its vsock daemon ([`QemuVm::wait_for_either`]), then lets the
    /// console's last lines reach the log.
    async fn wait(&mut self) -> io::Result<ExitStatus> {
        let ended = self.wait_for_either().await;
        self.console.finish().await;
        ended
    }

    async fn kill(&mut self) -> io::Result<()> {
        machine::kill(&mut self.qemu).await?;
        machine::kill(&mut self.daemon).await?;
        self.console.finish().await;
        Ok(())
    }

    fn freezer(&self) -> Arc<dyn Freezer> {
        self.qmp.clone()
    }
}

impl QemuVm {
    /// Ends with QEMU, or with the vsock daemon: a guest whose daemon died would hold its
    /// invocation until the function's timeout, so QEMU is killed and that is the error.
    async fn wait_for_either(&mut self) -> io::Result<ExitStatus> {
        tokio::select! {
            status = self.qemu.wait() => {
                let status = status?;
                machine::kill(&mut self.daemon).await?;
                Ok(status)
            }
            daemon = self.daemon.wait() => {
                let daemon = daemon?;
                // The daemon may have followed a QEMU that exited first.
                if let Some(status) = self.qemu.try_wait()? {
                    return Ok(status);
                }
                machine::kill(&mut self.qemu).await?;
                Err(io::Error::other(format!(
                    "{VHOST_VSOCK} exited ({daemon}), so the VM was killed"
                )))
            }
        }
    }
}
