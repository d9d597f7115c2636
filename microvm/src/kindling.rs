//! The `kindling` backend: our own `kindling-vmm` on KVM, booted from a Firecracker-layout
//! config file and then driven over its Firecracker-compatible API socket (which pauses and
//! resumes it between invocations), always started through `kindling-jailer`: in a chroot
//! holding only the VM's files, in namespaces of its own, as the VM's unprivileged user (see
//! [`machine::jailed`]). A guest with a network gets the host's tap as a descriptor the
//! VMM inherits (Kindling's `host_dev_fd`), since its jail's network namespace is empty.
//! Its serial console goes to the capped console log; SIGTERM
//! (which the jailer forwards) asks the guest to shut down (Ctrl-Alt-Del through the i8042),
//! as Firecracker's SendCtrlAltDel does.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::Child;

use crate::machine::{self, Jail, Limits, VmSpec};
use crate::snapstart::SnapshotFiles;
use crate::{console, working_set, Backend, RunningVm};
use kindling_runtime_api::config::Hypervisor;
use kindling_runtime_api::environment::{Freezer, StartPhases};

/// How long kindling-vmm may take to open its API socket.
const API_PATIENCE: Duration = Duration::from_secs(10);

/// What kindling-vmm may use beside the guest's RAM (it measures ~3 MiB: its heap, queues
/// and the drives' page cache it reads through).
const VMM_OVERHEAD_MIB: u64 = 64;

#[derive(Debug)]
pub struct KindlingVmm {
    /// The static `kindling-vmm` executable (the chroot holds no libraries).
    pub program: PathBuf,
    /// The static `kindling-jailer` executable.
    pub jailer: PathBuf,
}

#[async_trait]
impl Backend for KindlingVmm {
    fn kind(&self) -> Hypervisor {
        Hypervisor::Kindling
    }

    fn name(&self) -> &'static str {
        Hypervisor::Kindling.name()
    }

    async fn boot(&self, spec: &VmSpec) -> anyhow::Result<Box<dyn RunningVm>> {
        let config = spec.work_dir.join("vm-config.json");
        std::fs::write(&config, firecracker_config(spec).to_string())?;
        let mut files = vec![
            (spec.kernel.as_path(), false),
            (&spec.initramfs, false),
            (&config, false),
        ];
        files.extend(drives(spec));
        // The VMM writes its snapshot there when asked (SnapStart).
        files.extend(spec.snapshot_dir.as_deref().map(|dir| (dir, true)));
        let vm = self
            .start_jailed(
                spec,
                &files,
                &["--config-file".as_ref(), config.as_os_str()],
            )
            .await?;
        Ok(Box::new(vm))
    }

    fn snapshots(&self) -> Result<&Path, String> {
        Ok(&self.program)
    }

    /// A fresh jailed kindling-vmm with nothing configured, then Firecracker's
    /// `PUT /snapshot/load` (memory mapped privately from the file, so every clone shares
    /// its pages until it writes them; the snapshot's recorded working set read at once,
    /// or, where none is recorded yet, recorded after this VM's first invocation) with the
    /// vsock's host side in this VM's socket folder, resumed at once. The drives are reopened by the paths they were saved with,
    /// which the jail binds at the same paths, read-only like the snapshot's files.
    async fn restore(
        &self,
        spec: &VmSpec,
        snapshot: &SnapshotFiles,
    ) -> anyhow::Result<Box<dyn RunningVm>> {
        let mut files = drives(spec).collect::<Vec<_>>();
        files.extend([
            (snapshot.state.as_path(), false),
            (snapshot.memory.as_path(), false),
        ]);
        let started = Instant::now();
        let mut vm = self.start_jailed(spec, &files, &[]).await?;
        let jailed = started.elapsed();
        let prefetch = working_set::load(&snapshot.working_set);
        if prefetch.is_none() {
            vm.freezer = Arc::new(RecordingFreezer {
                api: vm.api.clone(),
                pending: std::sync::Mutex::new(
                    vm.vmm.id().map(|jailer| (jailer, snapshot.clone())),
                ),
            });
        }
        let load = json!({
            "snapshot_path": snapshot.state,
            "mem_backend": {"backend_type": "File", "backend_path": snapshot.memory},
            "vsock_override": {"uds_path": spec.vsock_uds},
            "network_overrides": interfaces(spec),
            "resume_vm": true,
            "prefetch": prefetch.unwrap_or_else(|| json!([])),
        });
        let started = Instant::now();
        if let Err(e) = vm.api.request("PUT", "/snapshot/load", &load).await {
            vm.kill().await?;
            return Err(e.into());
        }
        vm.start_phases = vec![("Jail Start", jailed), ("Snapshot Load", started.elapsed())];
        tracing::info!(jail = ?jailed, load = ?started.elapsed(), "kindling-vmm: snapshot restored");
        Ok(Box::new(vm))
    }
}

/// The VM's network interface on its own tap, by Kindling's `host_dev_fd` (the descriptor
/// the jail passes on, at the same number): a booted VM's `network-interfaces`, and a
/// restored one's `network_overrides` (the snapshot's interface attached to the tap this
/// clone leased); none when the VM has no network.
fn interfaces(spec: &VmSpec) -> Vec<serde_json::Value> {
    spec.tap
        .iter()
        .map(|tap| {
            json!({
                "iface_id": kindling_network::GUEST_IFNAME,
                "host_dev_name": tap.name,
                "host_dev_fd": tap.fd.as_raw_fd(),
            })
        })
        .collect()
}

/// The drives of `spec`, each with whether the VM may write it.
fn drives(spec: &VmSpec) -> impl Iterator<Item = (&Path, bool)> {
    spec.drives.iter().map(|d| (d.path.as_path(), !d.read_only))
}

impl KindlingVmm {
    /// Starts kindling-vmm jailed with `files` (each with whether it is writable) and its
    /// API socket in the VM's socket folder, and `args` after `--api-sock`; returns once
    /// the API answers connections.
    async fn start_jailed(
        &self,
        spec: &VmSpec,
        files: &[(&Path, bool)],
        args: &[&OsStr],
    ) -> anyhow::Result<KindlingVm> {
        machine::remove_leftover_jail(&machine::jail_dir(spec, &self.program));
        // The VMM's messages go beside its console, as before it was jailed.
        let (console, capture) = console::capture(&spec.console_log, console::LOG_CAP)?;
        let jail = Jail {
            program: &self.program,
            user: spec.user,
            files,
            kvm: true,
            // The host made and addressed the tap; the VMM adopts it (`host_dev_fd`).
            keep_fd: spec.tap.as_ref().map(|tap| tap.fd.as_fd()),
            // The guest's RAM twice (its memory, and the page cache of the memory file a
            // snapshot writes or a restore maps) and the VMM's few MiB; its vCPU threads,
            // API and event loop.
            limits: Limits {
                memory_mib: 2 * u64::from(spec.memory_mib) + VMM_OVERHEAD_MIB,
                pids: 16 + u32::from(spec.vcpus),
            },
        };
        let mut cmd = machine::jailed(&self.jailer, spec, &jail, console.try_clone()?, console);
        // The socket folder is the one the jailed VMM can write, at the same path inside
        // the jail and out (it makes its vsock socket there and reaches the host's
        // Runtime API socket linked into it).
        let api = Api(spec.socket_dir.join("api.sock"));
        cmd.arg("--api-sock").arg(&api.0).args(args);
        // Killed on drop, should the wait below fail.
        let mut vmm = machine::spawn(&mut cmd, "kindling-jailer")
            .context("build it with scripts/build-guest.sh")?;
        machine::wait_for_path(&api.0, &mut vmm, "kindling-vmm", API_PATIENCE).await?;
        api.wait_listening(API_PATIENCE).await?;
        let api = Arc::new(api);
        Ok(KindlingVm {
            vmm,
            freezer: api.clone(),
            api,
            console: capture,
            start_phases: Vec::new(),
        })
    }
}

/// The VM in Firecracker's `--config-file` layout.
fn firecracker_config(spec: &VmSpec) -> serde_json::Value {
    let drives: Vec<_> = spec
        .drives
        .iter()
        .map(|d| {
            json!({
                "drive_id": d.id,
                "path_on_host": d.path,
                "is_root_device": false,
                "is_read_only": d.read_only,
            })
        })
        .collect();
    json!({
        "boot-source": {
            "kernel_image_path": spec.kernel,
            "initrd_path": spec.initramfs,
            "boot_args": spec.cmdline,
        },
        "drives": drives,
        "network-interfaces": interfaces(spec),
        "machine-config": { "vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mib },
        "vsock": { "guest_cid": spec.guest_cid, "uds_path": spec.vsock_uds },
    })
}

struct KindlingVm {
    /// The jailer, which stands for the jailed VMM.
    vmm: Child,
    api: Arc<Api>,
    /// Pauses and resumes it between invocations: its API, or for a restored VM that
    /// records its snapshot's working set, [`RecordingFreezer`].
    freezer: Arc<dyn Freezer>,
    console: console::Capture,
    /// A restore's jail start (jailer → API answering) and `PUT /snapshot/load` (state
    /// read, memory mapped, devices and vCPUs restored, resumed).
    start_phases: StartPhases,
}

/// kindling-vmm's API socket. It serves one connection at a time: each request gets a
/// connection of its own.
struct Api(PathBuf);

impl Api {
    /// The socket file appears at bind(2), a moment before the VMM listens on it; a
    /// connection in between is refused (two restoring clones on a loaded machine met it).
    async fn wait_listening(&self, limit: Duration) -> io::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match UnixStream::connect(&self.0).await {
                Ok(_) => return Ok(()),
                Err(e)
                    if e.kind() == io::ErrorKind::ConnectionRefused
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One request; anything but a 2xx is an error carrying the API's fault message.
    async fn request(&self, method: &str, path: &str, body: &Value) -> io::Result<()> {
        let body = body.to_string();
        let mut stream = UnixStream::connect(&self.0).await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        let answer = String::from_utf8_lossy(&answer);
        let status = answer.split(' ').nth(1).unwrap_or_default();
        if status.starts_with('2') {
            return Ok(());
        }
        let fault = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        Err(io::Error::other(format!(
            "kindling-vmm answered {method} {path} with {status}: {fault}"
        )))
    }
}

/// Firecracker's `PATCH /vm`: kindling-vmm parks every vCPU outside `KVM_RUN` (and
/// answers once they are) and lets them run again.
#[async_trait]
impl Freezer for Api {
    async fn freeze(&self) -> io::Result<()> {
        self.request("PATCH", "/vm", &json!({"state": "Paused"}))
            .await
    }

    async fn thaw(&self) -> io::Result<()> {
        self.request("PATCH", "/vm", &json!({"state": "Resumed"}))
            .await
    }
}

/// The freezer of a VM restored from a snapshot with no working set recorded yet: once
/// paused the first time (its first invocation answered), it records which parts of the
/// memory file the VM touched, for later restores to read at once ([`working_set`]).
struct RecordingFreezer {
    api: Arc<Api>,
    /// The jailer's pid and the snapshot, until the record is made.
    pending: std::sync::Mutex<Option<(u32, SnapshotFiles)>>,
}

#[async_trait]
impl Freezer for RecordingFreezer {
    async fn freeze(&self) -> io::Result<()> {
        self.api.freeze().await?;
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((jailer, snapshot)) = pending {
            let recorded = tokio::task::spawn_blocking(move || {
                let vmm = jailed_pid(jailer)?;
                working_set::record(vmm, &snapshot.memory, &snapshot.working_set)
            })
            .await;
            match recorded {
                Ok(Ok(recorded)) => {
                    tracing::info!(
                        pages = recorded.pages,
                        bytes = recorded.bytes,
                        "kindling-vmm: recorded the snapshot's working set"
                    )
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot record the snapshot's working set")
                }
                Err(e) => tracing::warn!(error = %e, "cannot record the snapshot's working set"),
            }
        }
        Ok(())
    }

    async fn thaw(&self) -> io::Result<()> {
        self.api.thaw().await
    }
}

/// The jailed VMM's pid: the jailer's only child (the first process of the jail's own
/// PID namespace, which execs the VMM).
fn jailed_pid(jailer: u32) -> anyhow::Result<u32> {
    let path = format!("/proc/{jailer}/task/{jailer}/children");
    let children = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    children
        .split_whitespace()
        .next()
        .and_then(|pid| pid.parse().ok())
        .with_context(|| format!("{path}: no child"))
}

#[async_trait]
impl RunningVm for KindlingVm {
    fn is_running(&mut self) -> bool {
        matches!(self.vmm.try_wait(), Ok(None))
    }

    async fn request_shutdown(&mut self) -> io::Result<()> {
        let pid = self
            .vmm
            .id()
            .ok_or_else(|| io::Error::other("kindling-vmm has exited"))?;
        let pid = libc::pid_t::try_from(pid)
            .map_err(|_| io::Error::other(format!("pid {pid} does not fit a pid_t")))?;
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.vmm.wait().await?;
        self.console.finish().await;
        Ok(status)
    }

    async fn kill(&mut self) -> io::Result<()> {
        machine::kill(&mut self.vmm).await?;
        self.console.finish().await;
        Ok(())
    }

    fn freezer(&self) -> Arc<dyn Freezer> {
        self.freezer.clone()
    }

    fn start_phases(&self) -> StartPhases {
        self.start_phases.clone()
    }

    /// Firecracker's way: `PATCH /vm` Paused, a full `PUT /snapshot/create`, Resumed (the
    /// VM is resumed whether or not the snapshot succeeded).
    async fn snapshot(&mut self, into: &SnapshotFiles) -> anyhow::Result<()> {
        self.api.freeze().await?;
        let create = json!({
            "snapshot_type": "Full",
            "snapshot_path": into.state,
            "mem_file_path": into.memory,
        });
        let created = self.api.request("PUT", "/snapshot/create", &create).await;
        self.api.thaw().await?;
        Ok(created?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Drive;

    /// The seam between the launcher and the VMM: what `kindling serve` writes is what
    /// `kindling-vmm --config-file` reads and accepts, field for field.
    #[test]
    fn the_launchers_config_is_a_valid_kindling_vmm_config() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, b"x").unwrap();
            path
        };
        let spec = VmSpec {
            kernel: file("bzImage"),
            initramfs: file("initramfs.cpio.gz"),
            cmdline: "console=ttyS0 reboot=k".into(),
            drives: vec![
                Drive {
                    id: "root".into(),
                    path: file("rootfs.ext4"),
                    read_only: true,
                },
                Drive {
                    id: "task".into(),
                    path: file("code.ext4"),
                    read_only: true,
                },
            ],
            memory_mib: 128,
            vcpus: 2,
            guest_cid: 7,
            vsock_uds: dir.path().join("v.sock"),
            console_log: dir.path().join("console.log"),
            work_dir: dir.path().to_path_buf(),
            socket_dir: dir.path().to_path_buf(),
            user: crate::machine::VmUser {
                uid: 900_000,
                gid: 900_000,
            },
            snapshot_dir: None,
            // Any descriptor will do for the config (kindling-vmm checks it is the tap).
            tap: Some(crate::machine::GuestTap {
                fd: Arc::new(std::fs::File::open("/dev/null").unwrap().into()),
                name: "knet7".into(),
            }),
        };
        let config =
            kindling_vmm::config::VmmConfig::from_json(&firecracker_config(&spec).to_string())
                .unwrap();
        config.validate().unwrap();
        let boot = config.boot_source.as_ref().unwrap();
        assert_eq!(boot.kernel_image_path, spec.kernel);
        assert_eq!(boot.initrd_path.as_ref(), Some(&spec.initramfs));
        assert_eq!(boot.boot_args.as_deref(), Some(spec.cmdline.as_str()));
        let drives: Vec<_> = config
            .drives
            .iter()
            .map(|d| {
                (
                    d.drive_id.as_str(),
                    &d.path_on_host,
                    d.is_read_only,
                    d.is_root_device,
                )
            })
            .collect();
        assert_eq!(
            drives,
            [
                ("root", &spec.drives[0].path, true, false),
                ("task", &spec.drives[1].path, true, false)
            ]
        );
        assert_eq!(config.machine_config.vcpu_count, 2);
        assert_eq!(config.machine_config.mem_size_mib, 128);
        let vsock = config.vsock.as_ref().unwrap();
        assert_eq!((vsock.guest_cid, &vsock.uds_path), (7, &spec.vsock_uds));
        let tap = spec.tap.as_ref().unwrap();
        let nets: Vec<_> = config
            .network_interfaces
            .iter()
            .map(|n| (n.iface_id.as_str(), n.host_dev_name.as_str(), n.host_dev_fd))
            .collect();
        assert_eq!(nets, [("eth0", "knet7", Some(tap.fd.as_raw_fd()))]);
    }
}
