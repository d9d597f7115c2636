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
//!
//! SnapStart: QEMU cannot migrate a VM with vhost-user-vsock ("State blocked by
//! non-migratable device '…/vhost-user-vsock'"), so the VM that takes a function's
//! snapshot, and every clone restored from it, reaches the host over a virtio-serial port
//! instead ([`SerialLink`]; no vsock daemon). The snapshot is QEMU's own migration
//! stream: `stop`, `migrate` to a `file:` URI (the guest's RAM and every device's
//! state, the port included), `cont`. A clone starts QEMU with `-incoming defer`, loads
//! the file with `migrate-incoming` and `cont`s; restored with no host at the port's
//! end, the guest learns that its old session is gone (the port reads end-of-file), and
//! the host connects only once the guest has closed the port (QMP's `VSERPORT_CHANGE`
//! for its reopening, then `query-chardev`'s `frontend-open` for its closing), so a clone
//! never mistakes the new host session for the snapshot's.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use kindling_runtime_api::environment::StartPhases;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::process::Child;

use crate::machine::{self, Jail, Limits, VmSpec, VmUser};
use crate::serial_link::SerialLink;
use crate::snapstart::SnapshotFiles;
use crate::{console, guest_clock, Backend, RunningVm};
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

/// The id of the virtio-serial port of the host link (in QMP's `VSERPORT_CHANGE`).
const HOST_PORT_ID: &str = "hostport";
/// The id of the chardev behind that port (in QMP's `query-chardev`).
const HOST_PORT_CHARDEV: &str = "hostport";
/// How often a restore asks whether the guest has closed its port.
const PORT_POLL: Duration = Duration::from_millis(5);
/// What a QEMU snapshot's state file says it is: the memory file is QEMU's migration
/// stream, which carries the devices' state too.
const SNAPSHOT_FORMAT: &str = "qemu-migration-stream/1";
/// How long a migration to or from a file may take.
const MIGRATION_PATIENCE: Duration = Duration::from_secs(120);
/// How long a restored guest may take to let go of its snapshot's host session.
const RESET_PATIENCE: Duration = Duration::from_secs(60);

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
    /// `qemu-system-x86_64`, found on `$PATH` ([`Qemu::new`]).
    program: PathBuf,
    /// Under TCG, the kernel arguments that give the guest the TSC as its clock
    /// ([`guest_clock`]).
    guest_clock: Option<String>,
}

impl Qemu {
    /// The backend with `accel`, its VMs started through `jailer`.
    pub fn new(accel: Accel, jailer: PathBuf) -> anyhow::Result<Self> {
        let program =
            machine::find_program(QEMU).context("is Debian's qemu-system-x86 installed?")?;
        let guest_clock = match accel {
            Accel::Kvm => None,
            Accel::Tcg => guest_clock::tcg_kernel_args(),
        };
        Ok(Qemu {
            accel,
            jailer,
            program,
            guest_clock,
        })
    }
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

    /// QEMU itself: its migration stream is the snapshot's format.
    fn snapshots(&self) -> Result<&std::path::Path, String> {
        Ok(&self.program)
    }

    /// A VM that will be snapshotted (`spec.snapshot_dir`) gets the serial link; every
    /// other one vsock through its daemon.
    async fn boot(&self, spec: &VmSpec) -> anyhow::Result<Box<dyn RunningVm>> {
        let line = if spec.snapshot_dir.is_some() {
            Line::Serial
        } else {
            Line::Vsock
        };
        let mut files: Vec<(&Path, bool)> =
            vec![(spec.kernel.as_path(), false), (&spec.initramfs, false)];
        files.extend(spec.snapshot_dir.as_deref().map(|dir| (dir, true)));
        let mut vm = self.start(spec, line, &files, &[]).await?;
        if line == Line::Serial {
            vm.connect_link(spec).await?;
        }
        Ok(Box::new(vm))
    }

    /// A fresh QEMU of the snapshot's VM waiting for its state (`-incoming defer`), which
    /// `migrate-incoming` reads from the snapshot's stream; then `cont`, and the host end
    /// of the serial link once the guest has dropped the snapshot's session.
    async fn restore(
        &self,
        spec: &VmSpec,
        snapshot: &SnapshotFiles,
    ) -> anyhow::Result<Box<dyn RunningVm>> {
        let state = std::fs::read_to_string(&snapshot.state)
            .with_context(|| snapshot.state.display().to_string())?;
        let format: Value = serde_json::from_str(&state)
            .with_context(|| format!("{}: not a QEMU snapshot", snapshot.state.display()))?;
        if format["format"] != SNAPSHOT_FORMAT {
            anyhow::bail!(
                "{}: format {} is not {SNAPSHOT_FORMAT}",
                snapshot.state.display(),
                format["format"]
            );
        }
        let started = Instant::now();
        // QEMU opens the kernel and initramfs it was started with again, though the guest
        // it restores runs already.
        let files = [
            (spec.kernel.as_path(), false),
            (&spec.initramfs, false),
            (&snapshot.memory, false),
        ];
        let mut vm = self
            .start(spec, Line::Serial, &files, &["-incoming", "defer"])
            .await?;
        let jailed = started.elapsed();
        let started = Instant::now();
        if let Err(e) = vm.load(spec, &snapshot.memory).await {
            vm.kill().await?;
            return Err(e);
        }
        vm.start_phases = vec![("Jail Start", jailed), ("Snapshot Load", started.elapsed())];
        tracing::info!(jail = ?jailed, load = ?started.elapsed(), "qemu: snapshot restored");
        Ok(Box::new(vm))
    }
}

/// How the guest reaches the host's Runtime API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// vsock, through a `vhost-device-vsock` daemon of the VM's own.
    Vsock,
    /// A virtio-serial port ([`SerialLink`]): migratable.
    Serial,
}

impl Qemu {
    /// Starts QEMU jailed with `files` (each with whether it may write it) beside its
    /// drives, and its vsock daemon first when `line` is vsock; `extra` goes after
    /// QEMU's own arguments.
    async fn start(
        &self,
        spec: &VmSpec,
        line: Line,
        files: &[(&Path, bool)],
        extra: &[&str],
    ) -> anyhow::Result<QemuVm> {
        let sockets = Sockets::of(spec);
        // What a QEMU of this environment left behind (a restore that failed): its jail,
        // which would keep the next jailer from starting, and its sockets, which would
        // look like the new QEMU's.
        machine::remove_leftover_jail(&machine::jail_dir(spec, &self.program));
        for socket in [&sockets.qmp, &sockets.host_port] {
            let _ = std::fs::remove_file(socket);
        }
        let helper_log = machine::log_file(&spec.work_dir.join("hypervisor.log"))?;
        let system = system_folders();
        let daemon = match line {
            Line::Vsock => Some(
                self.start_daemon(spec, &sockets, &system, &helper_log)
                    .await?,
            ),
            Line::Serial => None,
        };

        let (console, capture) = console::capture(&spec.console_log, console::LOG_CAP)?;
        let user = match self.accel {
            Accel::Kvm => kvm_user(spec.user)?,
            Accel::Tcg => spec.user,
        };
        let mut jailed = system;
        jailed.extend_from_slice(files);
        jailed.extend(spec.drives.iter().map(|d| (d.path.as_path(), !d.read_only)));
        let qemu_jail = Jail {
            program: &self.program,
            user,
            files: &jailed,
            kvm: self.accel == Accel::Kvm,
            // The host made and addressed the tap; QEMU only uses it (no privilege needed,
            // and its own network namespace stays empty).
            keep_fd: spec.tap.as_ref().map(|tap| tap.fd.as_fd()),
            limits: self.limits(spec),
        };
        let mut qemu = machine::jailed(&self.jailer, spec, &qemu_jail, console, helper_log);
        qemu.args(self.args(spec, line, &sockets)).args(extra);
        let mut qemu = machine::spawn(&mut qemu, QEMU)?;
        if line == Line::Serial {
            let started = machine::wait_for_path(
                &sockets.host_port,
                &mut qemu,
                QEMU,
                Duration::from_secs(10),
            )
            .await;
            // QEMU says why it did not start in its log.
            started.with_context(|| console::tail(&spec.work_dir.join("hypervisor.log"), 5))?;
        }
        Ok(QemuVm {
            qemu,
            line: match daemon {
                Some(daemon) => HostLine::Vsock(daemon),
                None => HostLine::Serial(None),
            },
            qmp: Arc::new(Qmp(sockets.qmp)),
            console: capture,
            start_phases: Vec::new(),
        })
    }

    /// The VM's vsock daemon, jailed, once its socket is there.
    async fn start_daemon(
        &self,
        spec: &VmSpec,
        sockets: &Sockets,
        system: &[(&Path, bool)],
        log: &std::os::fd::OwnedFd,
    ) -> anyhow::Result<Child> {
        let daemon_program = machine::find_program(VHOST_VSOCK).context(
            "is it installed? (`cargo install vhost-device-vsock`, done by scripts/setup.sh)",
        )?;
        let daemon_jail = Jail {
            program: &daemon_program,
            user: spec.user,
            files: system,
            kvm: false,
            keep_fd: None,
            limits: VHOST_VSOCK_LIMITS,
        };
        let mut daemon = machine::jailed(
            &self.jailer,
            spec,
            &daemon_jail,
            log.try_clone()?,
            log.try_clone()?,
        );
        daemon
            .arg("--guest-cid")
            .arg(spec.guest_cid.to_string())
            .arg("--socket")
            .arg(&sockets.vhost_vsock)
            .arg("--uds-path")
            .arg(&spec.vsock_uds);
        let mut daemon = machine::spawn(&mut daemon, VHOST_VSOCK)?;
        machine::wait_for_path(
            &sockets.vhost_vsock,
            &mut daemon,
            VHOST_VSOCK,
            Duration::from_secs(10),
        )
        .await?;
        Ok(daemon)
    }
}

/// The sockets of one VM, in its socket folder.
struct Sockets {
    /// The vsock daemon's vhost-user socket.
    vhost_vsock: PathBuf,
    qmp: PathBuf,
    /// QEMU's end of the serial link's port.
    host_port: PathBuf,
}

impl Sockets {
    fn of(spec: &VmSpec) -> Self {
        Sockets {
            vhost_vsock: spec.socket_dir.join("vhost-vsock.sock"),
            qmp: spec.socket_dir.join("qmp.sock"),
            host_port: spec.socket_dir.join("host-port.sock"),
        }
    }
}

/// The Runtime API socket linked into the VM's socket folder, where guest connections to
/// port 9001 arrive (vsock's `<uds_path>_9001`, which the serial link uses too).
fn runtime_api_socket(spec: &VmSpec) -> PathBuf {
    let mut path = spec.vsock_uds.clone().into_os_string();
    path.push(format!("_{}", kindling_wire::RUNTIME_API_PORT));
    PathBuf::from(path)
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
    fn args(&self, spec: &VmSpec, line: Line, sockets: &Sockets) -> Vec<String> {
        let mem = spec.memory_mib;
        let accel = match self.accel {
            Accel::Kvm => "kvm".to_string(),
            Accel::Tcg => format!("tcg,tb-size={TCG_CODE_CACHE_MIB}"),
        };
        let mut cmdline = spec.cmdline.clone();
        if let Some(words) = &self.guest_clock {
            cmdline.push(' ');
            cmdline.push_str(words);
        }
        if line == Line::Serial {
            // Tells bootstrap (through init) where the host is.
            let host = kindling_wire::HostAddr::VirtioPort(kindling_wire::mux::PORT_NAME.into());
            cmdline.push_str(&format!(
                " kindling.env={}={host}",
                kindling_wire::ENV_HOST_ADDR
            ));
        }
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
            &cmdline,
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
            "-device",
            "virtio-rng-device",
            // A keyboard controller, so that a Ctrl-Alt-Del asks the guest to shut down.
            "-device",
            "i8042",
            "-qmp",
            &format!("unix:{},server=on,wait=off", sockets.qmp.display()),
        ]
        .map(String::from)
        .to_vec();
        match line {
            Line::Vsock => args.extend([
                "-chardev".to_string(),
                format!("socket,id=vsock,path={}", sockets.vhost_vsock.display()),
                "-device".to_string(),
                "vhost-user-vsock-device,chardev=vsock".to_string(),
            ]),
            // QEMU serves the port's host end; the host connects (`SerialLink`).
            Line::Serial => args.extend([
                "-chardev".to_string(),
                format!(
                    "socket,id={HOST_PORT_CHARDEV},path={},server=on,wait=off",
                    sockets.host_port.display()
                ),
                "-device".to_string(),
                "virtio-serial-device,max_ports=2".to_string(),
                "-device".to_string(),
                format!(
                    "virtserialport,id={HOST_PORT_ID},chardev={HOST_PORT_CHARDEV},name={}",
                    kindling_wire::mux::PORT_NAME
                ),
            ]),
        }
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
    line: HostLine,
    qmp: Arc<Qmp>,
    console: console::Capture,
    /// A restore's jail start and snapshot load.
    start_phases: StartPhases,
}

/// The process or session that carries the guest's line to the host.
enum HostLine {
    /// The VM's vsock daemon.
    Vsock(Child),
    /// The serial link's host end, once connected.
    Serial(Option<SerialLink>),
}

/// QEMU's QMP socket (`-qmp unix:...,server=on,wait=off`), which takes one client at a
/// time: each use gets a connection of its own.
struct Qmp(PathBuf);

impl Qmp {
    /// Runs one command (a QMP `execute` object) and waits for its answer.
    async fn execute(&self, command: &str) -> io::Result<()> {
        let command: Value = serde_json::from_str(command)
            .map_err(|e| io::Error::other(format!("QMP command {command}: {e}")))?;
        self.connect().await?.execute(&command).await.map(drop)
    }

    async fn connect(&self) -> io::Result<QmpSession> {
        let (read, write) = UnixStream::connect(&self.0).await?.into_split();
        let mut session = QmpSession {
            lines: BufReader::new(read).lines(),
            write,
            events: Vec::new(),
        };
        session.line().await?; // the greeting
        session
            .execute(&json!({"execute": "qmp_capabilities"}))
            .await?;
        Ok(session)
    }
}

/// One QMP connection: commands one after another, and the events QEMU sends meanwhile.
struct QmpSession {
    lines: Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
    /// Events read while waiting for an answer, for [`QmpSession::event`].
    events: Vec<Value>,
}

impl QmpSession {
    async fn line(&mut self) -> io::Result<Value> {
        let line = self.lines.next_line().await?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "QMP closed the connection")
        })?;
        serde_json::from_str(&line)
            .map_err(|e| io::Error::other(format!("QMP answered {line:?}: {e}")))
    }

    /// Runs `command`; its `return` value, or its error.
    async fn execute(&mut self, command: &Value) -> io::Result<Value> {
        self.write.write_all(command.to_string().as_bytes()).await?;
        self.write.write_all(b"\n").await?;
        loop {
            let mut answer = self.line().await?;
            if let Some(value) = answer.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = answer.get("error") {
                return Err(io::Error::other(format!("QMP {command}: {error}")));
            }
            // Events (`STOP`, `RESUME`, ...) may come before the command's answer.
            self.events.push(answer);
        }
    }

    /// Waits for an event `wanted` accepts (one seen already counts).
    async fn event(&mut self, wanted: impl Fn(&Value) -> bool) -> io::Result<Value> {
        if let Some(at) = self.events.iter().position(&wanted) {
            return Ok(self.events.remove(at));
        }
        loop {
            let line = self.line().await?;
            if wanted(&line) {
                return Ok(line);
            }
        }
    }

    /// Waits until the restored guest has closed the host link's port: it had the port
    /// open when the snapshot was taken, and closes it once it let go of that session.
    /// The port's opening as the restored VM starts is the first `VSERPORT_CHANGE` and
    /// comes at once; its closing, a second event within QEMU's one-second throttle of
    /// that event, would come up to a second late, so the closing is read from the
    /// chardev's `frontend-open` instead (the guest's side of the port, unthrottled).
    async fn port_closed_by_guest(&mut self) -> io::Result<()> {
        let port_opened = |event: &Value| {
            event["event"] == "VSERPORT_CHANGE"
                && event["data"]["id"] == HOST_PORT_ID
                && event["data"]["open"] == true
        };
        self.event(port_opened).await?;
        while self.frontend_open(HOST_PORT_CHARDEV).await? {
            tokio::time::sleep(PORT_POLL).await;
        }
        Ok(())
    }

    /// Whether the device in front of the chardev `label` has it open (`query-chardev`).
    async fn frontend_open(&mut self, label: &str) -> io::Result<bool> {
        let chardevs = self.execute(&json!({"execute": "query-chardev"})).await?;
        chardevs
            .as_array()
            .into_iter()
            .flatten()
            .find(|chardev| chardev["label"] == label)
            .and_then(|chardev| chardev["frontend-open"].as_bool())
            .ok_or_else(|| io::Error::other(format!("QMP query-chardev lists no {label:?}")))
    }

    /// Polls `query-migrate` until the migration (out or in) completed.
    async fn migrated(&mut self) -> anyhow::Result<()> {
        let polling = async {
            loop {
                let status = self.execute(&json!({"execute": "query-migrate"})).await?;
                match status["status"].as_str() {
                    Some("completed") => return anyhow::Ok(()),
                    Some("failed" | "cancelled") => {
                        anyhow::bail!(
                            "QEMU's migration {}: {}",
                            status["status"],
                            status["error-desc"]
                        )
                    }
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        };
        tokio::time::timeout(MIGRATION_PATIENCE, polling)
            .await
            .map_err(|_| anyhow::anyhow!("QEMU's migration took over {MIGRATION_PATIENCE:?}"))?
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

impl QemuVm {
    /// Connects the host end of the serial link.
    async fn connect_link(&mut self, spec: &VmSpec) -> anyhow::Result<()> {
        let link = SerialLink::connect(&Sockets::of(spec).host_port, runtime_api_socket(spec))
            .await
            .context("connecting to the VM's serial link")?;
        self.line = HostLine::Serial(Some(link));
        Ok(())
    }

    /// Loads the snapshot's migration stream `from` into this `-incoming defer` QEMU and
    /// lets it run; then connects the serial link, once the guest has closed its port
    /// (it does when it reads the end of its snapshot's session, or had it closed) and so
    /// can tell the new session from the old.
    async fn load(&mut self, spec: &VmSpec, from: &Path) -> anyhow::Result<()> {
        let mut qmp = self.qmp.connect().await?;
        qmp.execute(&json!({"execute": "migrate-incoming", "arguments": {"uri": file_uri(from)}}))
            .await?;
        qmp.migrated().await?;
        qmp.execute(&json!({"execute": "cont"})).await?;
        tokio::time::timeout(RESET_PATIENCE, qmp.port_closed_by_guest())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the restored guest kept its old host session for {RESET_PATIENCE:?}"
                )
            })??;
        self.connect_link(spec).await
    }
}

/// A `file:` migration URI; QEMU takes the path as it is (no escaping).
fn file_uri(path: &Path) -> String {
    format!("file:{}", path.display())
}

#[async_trait]
impl RunningVm for QemuVm {
    /// QEMU and what carries its line to the host: without it the guest cannot reach the
    /// host again.
    fn is_running(&mut self) -> bool {
        let line = match &mut self.line {
            HostLine::Vsock(daemon) => matches!(daemon.try_wait(), Ok(None)),
            HostLine::Serial(link) => link.as_ref().is_none_or(|link| !link.is_finished()),
        };
        line && matches!(self.qemu.try_wait(), Ok(None))
    }

    async fn request_shutdown(&mut self) -> io::Result<()> {
        let keys = r#"{"execute":"send-key","arguments":{"keys":[{"type":"qcode","data":"ctrl"},{"type":"qcode","data":"alt"},{"type":"qcode","data":"delete"}]}}"#;
        self.qmp.execute(keys).await
    }

    /// Ends with QEMU or its line to the host ([`QemuVm::wait_for_either`]), then lets
    /// the console's last lines reach the log.
    async fn wait(&mut self) -> io::Result<ExitStatus> {
        let ended = self.wait_for_either().await;
        self.console.finish().await;
        ended
    }

    async fn kill(&mut self) -> io::Result<()> {
        machine::kill(&mut self.qemu).await?;
        if let HostLine::Vsock(daemon) = &mut self.line {
            machine::kill(daemon).await?;
        }
        self.console.finish().await;
        Ok(())
    }

    fn freezer(&self) -> Arc<dyn Freezer> {
        self.qmp.clone()
    }

    fn start_phases(&self) -> StartPhases {
        self.start_phases.clone()
    }

    /// QMP `stop`, `migrate` to the snapshot's memory file (QEMU's stream: RAM and device
    /// state), the state file naming the format, `cont` (whether or not it succeeded).
    /// The serial link stays up: this guest keeps its session.
    async fn snapshot(&mut self, into: &SnapshotFiles) -> anyhow::Result<()> {
        if !matches!(self.line, HostLine::Serial(_)) {
            anyhow::bail!("a QEMU VM on vsock cannot migrate (it was not booted for SnapStart)");
        }
        let mut qmp = self.qmp.connect().await?;
        qmp.execute(&json!({"execute": "stop"})).await?;
        let taken = async {
            qmp.execute(
                &json!({"execute": "migrate", "arguments": {"uri": file_uri(&into.memory)}}),
            )
            .await?;
            qmp.migrated().await?;
            let version = qmp.execute(&json!({"execute": "query-version"})).await?;
            let state = json!({"format": SNAPSHOT_FORMAT, "qemu": version});
            std::fs::write(&into.state, state.to_string())
                .with_context(|| into.state.display().to_string())
        }
        .await;
        qmp.execute(&json!({"execute": "cont"})).await?;
        taken
    }
}

impl QemuVm {
    /// Ends with QEMU, or with its line to the host: a guest whose vsock daemon died, or
    /// whose serial link ended, would hold its invocation until the function's timeout, so
    /// QEMU is killed and that is the error.
    async fn wait_for_either(&mut self) -> io::Result<ExitStatus> {
        let line_ended = match &mut self.line {
            HostLine::Vsock(daemon) => tokio::select! {
                status = self.qemu.wait() => {
                    let status = status?;
                    machine::kill(daemon).await?;
                    return Ok(status);
                }
                exited = daemon.wait() => format!("{VHOST_VSOCK} exited ({})", exited?),
            },
            HostLine::Serial(Some(link)) => tokio::select! {
                status = self.qemu.wait() => return status,
                () = link.ended() => "its serial link to the host ended".to_string(),
            },
            HostLine::Serial(None) => return self.qemu.wait().await,
        };
        // The line may have followed a QEMU that exited first.
        if let Some(status) = self.qemu.try_wait()? {
            return Ok(status);
        }
        machine::kill(&mut self.qemu).await?;
        Err(io::Error::other(format!(
            "{line_ended}, so the VM was killed"
        )))
    }
}
