//! [`MicroVmLauncher`]: the scheduler's [`Launcher`] for microVM environments, booted or,
//! for SnapStart functions with a snapshot, restored ([`crate::snapstart`]).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kindling_network::{Lease, Network};
use kindling_runtime_api::environment::{
    Environment, EnvironmentSpec, Freezer, Function, Launcher, Network as FunctionNetwork,
    StartPhases, StopMode,
};

use crate::machine::{Drive, GuestTap, VmSpec, VmUser, VmUserLease};
use crate::snapstart::{Creation, SnapshotKey, SnapshotStore};
use crate::{console, Backend, RunningVm};
use kindling_runtime_api::config::Hypervisor;

/// The files a guest of one runtime boots from.
#[derive(Debug, Clone)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The runtime's ext4 root image, attached read-only as `/dev/vda`.
    pub root_image: PathBuf,
}

/// Where boot files and code images come from (the image cache). Calls may build, so
/// they run on a blocking thread.
pub trait ImageSource: Send + Sync + 'static {
    fn boot_files(&self, runtime: &str) -> anyhow::Result<BootFiles>;
    /// The function's code as an ext4 image, attached read-only as `/dev/vdb`.
    fn code_image(&self, function: &Function) -> anyhow::Result<PathBuf>;
    /// Its layers as one ext4 image, attached read-only as `/dev/vdc` (which the root
    /// image's init configuration mounts at `/opt`); `None` without layers.
    fn layers_image(&self, function: &Function) -> anyhow::Result<Option<PathBuf>>;
}

pub struct MicroVmLauncher {
    /// Each function's hypervisor (functions may choose theirs).
    hypervisors: HashMap<String, Arc<dyn Backend>>,
    /// The hypervisor of functions not assigned one (those created through the API).
    default: Option<Arc<dyn Backend>>,
    images: Arc<dyn ImageSource>,
    /// Guest consoles are appended to `<logs_dir>/<function>.console.log` when an
    /// environment stops, for `kindling logs`.
    logs_dir: PathBuf,
    /// SnapStart functions' snapshots.
    snapshots: SnapshotStore,
    /// The host's networking for environments; `None`: no microVM gets a network.
    network: Option<Arc<Network>>,
}

impl std::fmt::Debug for MicroVmLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut hypervisors: Vec<(&String, &'static str)> = self
            .hypervisors
            .iter()
            .map(|(function, h)| (function, h.name()))
            .collect();
        hypervisors.sort();
        f.debug_struct("MicroVmLauncher")
            .field("hypervisors", &hypervisors)
            .field("logs_dir", &self.logs_dir)
            .finish_non_exhaustive()
    }
}

impl MicroVmLauncher {
    /// Snapshots of SnapStart functions go to `snapshots_dir`.
    pub fn new(images: Arc<dyn ImageSource>, logs_dir: PathBuf, snapshots_dir: PathBuf) -> Self {
        Self {
            hypervisors: HashMap::new(),
            default: None,
            images,
            logs_dir,
            snapshots: SnapshotStore::new(snapshots_dir),
            network: None,
        }
    }

    /// Gives every microVM of a function with `network = "outbound"` a tap and an address.
    pub fn set_network(&mut self, network: Arc<Network>) {
        self.network = Some(network);
    }

    /// The address block of a new environment of `function`, if it gets a network. A
    /// SnapStart clone gets its own too: it is re-addressed to it on its first event.
    fn network_for(&self, function: &Function) -> anyhow::Result<Option<Lease>> {
        let Some(network) = &self.network else {
            return Ok(None);
        };
        if function.network == FunctionNetwork::None {
            return Ok(None);
        }
        Ok(Some(network.lease()?))
    }

    /// Runs `function`'s environments on `hypervisor`.
    pub fn assign(&mut self, function: &str, hypervisor: Arc<dyn Backend>) {
        tracing::info!(
            function,
            hypervisor = hypervisor.name(),
            "microVM hypervisor chosen"
        );
        self.hypervisors.insert(function.to_string(), hypervisor);
    }

    /// Runs the environments of functions not [`assign`](Self::assign)ed one on `hypervisor`.
    pub fn assign_default(&mut self, hypervisor: Arc<dyn Backend>) {
        tracing::info!(
            hypervisor = hypervisor.name(),
            "microVM hypervisor of functions created through the API"
        );
        self.default = Some(hypervisor);
    }

    /// The guest kernel command line. `reboot=k` makes the guest's reboot(2) an i8042
    /// reset, which stops kindling-vmm (and QEMU, which runs with `-no-reboot`).
    fn cmdline(hypervisor: &dyn Backend, spec: &EnvironmentSpec) -> String {
        let mut cmdline = format!(
            "console=ttyS0 reboot=k panic=-1 quiet random.trust_cpu=on \
             kindling.root=/dev/vda kindling.task=/dev/vdb kindling.hostname={}",
            spec.function.name
        );
        if hypervisor.kind() == Hypervisor::Kindling {
            // kindling-vmm's i8042 is a bare keyboard controller (Firecracker's), and
            // the boot timer page exists only there. No `i8042.nopnp`: a kernel with ACPI
            // finds the controller's IRQ only through the DSDT.
            cmdline.push_str(" i8042.dumbkbd i8042.noaux i8042.nomux kindling.boot_timer=1");
        }
        cmdline
    }
}

#[async_trait]
impl Launcher for MicroVmLauncher {
    fn name(&self) -> &str {
        "microvm"
    }

    async fn start(&self, spec: &EnvironmentSpec) -> anyhow::Result<Box<dyn Environment>> {
        let Some(hypervisor) = self
            .hypervisors
            .get(&spec.function.name)
            .or(self.default.as_ref())
        else {
            anyhow::bail!(
                "no hypervisor was assigned to function {:?}",
                spec.function.name
            );
        };
        let images = self.images.clone();
        let function = spec.function.clone();
        let (files, code_image, layers_image) = tokio::task::spawn_blocking(move || {
            anyhow::Ok((
                images.boot_files(&function.runtime)?,
                images.code_image(&function)?,
                images.layers_image(&function)?,
            ))
        })
        .await??;
        let mut drives = vec![
            Drive {
                id: "root".into(),
                path: files.root_image,
                read_only: true,
            },
            Drive {
                id: "task".into(),
                path: code_image,
                read_only: true,
            },
        ];
        drives.extend(layers_image.map(|path| Drive {
            id: "opt".into(),
            path,
            read_only: true,
        }));
        std::fs::create_dir_all(&spec.dir)?;
        let user = VmUserLease::take()?;
        let socket_dir = socket_dir(spec, user.user())?;
        let mut vm_spec = VmSpec {
            kernel: files.kernel,
            initramfs: files.initramfs,
            cmdline: Self::cmdline(hypervisor.as_ref(), spec),
            drives,
            memory_mib: spec.function.memory_mb.max(128),
            vcpus: 1,
            guest_cid: 3,
            vsock_uds: socket_dir.join(VSOCK_UDS),
            console_log: spec.console_log(),
            work_dir: spec.dir.clone(),
            socket_dir,
            user: user.user(),
            snapshot_dir: None,
            tap: None,
        };
        let lease = self.network_for(&spec.function)?;
        if let Some(lease) = &lease {
            vm_spec.tap = Some(GuestTap {
                fd: Arc::new(lease.tap().await?),
                name: lease.ifname(),
            });
            vm_spec.cmdline.push(' ');
            vm_spec.cmdline.push_str(&lease.cmdline());
        }
        let started = Instant::now();
        let mut creation = None;
        let mut restored = None;
        let vm = match self.snapstart(hypervisor.as_ref(), &vm_spec, spec).await? {
            SnapStart::Restore(vm) => {
                restored = Some(Instant::now());
                vm
            }
            start => {
                if let SnapStart::Create(claimed) = start {
                    vm_spec.snapshot_dir = Some(claimed.staging_dir().to_path_buf());
                    creation = Some(claimed);
                }
                hypervisor.boot(&vm_spec).await?
            }
        };
        let hypervisor_start = started.elapsed();
        tracing::info!(env = %spec.id, hypervisor = hypervisor.name(), restored = restored.is_some(), "microVM started");
        Ok(Box::new(MicroVm {
            id: spec.id.clone(),
            function: spec.function.name.clone(),
            hypervisor: hypervisor.name(),
            vm,
            dir: spec.dir.clone(),
            console: vm_spec.console_log,
            logs_dir: self.logs_dir.clone(),
            started,
            hypervisor_start,
            creation,
            restored,
            _user: user,
            network: lease,
        }))
    }
}

/// How a microVM of a SnapStart function starts.
enum SnapStart {
    /// Restored from the function's snapshot.
    Restore(Box<dyn RunningVm>),
    /// Booted, to take the function's snapshot once its runtime has initialised.
    Create(Creation),
    /// Booted: not a SnapStart function, or its snapshot is being taken elsewhere.
    Boot,
}

impl MicroVmLauncher {
    /// Restores `spec`'s function from its snapshot when there is one (a failed restore is
    /// logged with its reason, and the snapshot dropped: this start boots and takes a
    /// fresh one), or claims the taking of that snapshot.
    async fn snapstart(
        &self,
        hypervisor: &dyn Backend,
        vm_spec: &VmSpec,
        spec: &EnvironmentSpec,
    ) -> anyhow::Result<SnapStart> {
        let function = &spec.function;
        if !function.snapstart {
            return Ok(SnapStart::Boot);
        }
        let program = match hypervisor.snapshots() {
            Ok(program) => program,
            Err(why) => {
                tracing::debug!(function = %function.name, %why, "SnapStart: booting");
                return Ok(SnapStart::Boot);
            }
        };
        let key = SnapshotKey::new(hypervisor.name(), program, vm_spec, function);
        if let Some(snapshot) = self.snapshots.find(&function.name, &key) {
            match hypervisor.restore(vm_spec, &snapshot).await {
                Ok(vm) => return Ok(SnapStart::Restore(vm)),
                Err(e) => {
                    tracing::warn!(env = %spec.id, error = format!("{e:#}"), "SnapStart: the snapshot did not restore; booting instead, and taking a fresh one");
                    self.snapshots.discard(&snapshot);
                    // The failed VMM may have left its sockets behind.
                    for socket in [
                        vm_spec.socket_dir.join("api.sock"),
                        vm_spec.vsock_uds.clone(),
                    ] {
                        let _ = std::fs::remove_file(socket);
                    }
                }
            }
        }
        Ok(self
            .snapshots
            .claim(&function.name, &key, vm_spec.user)?
            .map_or(SnapStart::Boot, SnapStart::Create))
    }
}

/// The VM's `uds_path`, in its socket folder.
const VSOCK_UDS: &str = "vsock.sock";

/// `<env dir>/vm`: the VM's socket folder, its user's alone (0700). The host's Runtime API
/// socket, which the scheduler bound before the start, is hard-linked into it as
/// `vsock.sock_9001` (the same socket: a guest connection to port 9001 reaches it) and
/// handed to the VM's user, who must be able to connect to it.
fn socket_dir(spec: &EnvironmentSpec, user: VmUser) -> anyhow::Result<PathBuf> {
    let dir = spec.dir.join("vm");
    kindling_plumbing::dirs::create_all(&dir, 0o700)?;
    std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid))?;
    let link = dir.join(format!("{VSOCK_UDS}_{}", kindling_wire::RUNTIME_API_PORT));
    // sun_path holds 108 bytes with the terminating NUL.
    if link.as_os_str().len() > 107 {
        anyhow::bail!(
            "{}: the socket path is longer than 107 bytes; choose a shorter state directory",
            link.display()
        );
    }
    std::fs::hard_link(spec.runtime_api_socket(), &link)?;
    std::os::unix::fs::chown(&link, Some(user.uid), Some(user.gid))?;
    Ok(dir)
}

struct MicroVm {
    id: String,
    function: String,
    hypervisor: &'static str,
    vm: Box<dyn RunningVm>,
    dir: PathBuf,
    console: PathBuf,
    logs_dir: PathBuf,
    started: Instant,
    /// Spawning the hypervisor (and its helpers) until it runs.
    hypervisor_start: Duration,
    /// SnapStart: the right to take the function's snapshot, until it is taken.
    creation: Option<Creation>,
    /// When the VM, restored from a snapshot, started running.
    restored: Option<Instant>,
    /// The VM's user id, free again once the VM is gone.
    _user: VmUserLease,
    /// Its address block, held until the VM is gone.
    network: Option<Lease>,
}

impl MicroVm {
    /// Appends this guest's console to the function's console log, then removes the
    /// environment's folder.
    fn clean_up(&self) -> io::Result<()> {
        if let Ok(text) = std::fs::read(&self.console) {
            std::fs::create_dir_all(&self.logs_dir)?;
            let path = self.logs_dir.join(format!("{}.console.log", self.function));
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            use std::io::Write;
            writeln!(log, "=== environment {} ({}) ===", self.id, self.hypervisor)?;
            log.write_all(&text)?;
        }
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Environment for MicroVm {
    fn id(&self) -> &str {
        &self.id
    }

    fn is_alive(&mut self) -> bool {
        self.vm.is_running()
    }

    async fn exited(&mut self) -> String {
        let status = self.vm.wait().await;
        let lived = self.started.elapsed().as_secs_f64();
        let how = match status {
            Ok(s) if s.success() => "the guest shut down".to_string(),
            Ok(s) => format!("{} exited ({s})", self.hypervisor),
            Err(e) => format!("{}: {e}", self.hypervisor),
        };
        let tail = console::tail(&self.console, 5);
        format!(
            "{how} after {lived:.2} s; console: {}",
            tail.replace('\n', " | ")
        )
    }

    async fn stop(&mut self, mode: StopMode) -> io::Result<()> {
        match mode {
            StopMode::Graceful(grace) => {
                let asked = self.vm.request_shutdown().await;
                let done =
                    asked.is_ok() && tokio::time::timeout(grace, self.vm.wait()).await.is_ok();
                if !done {
                    self.vm.kill().await?;
                }
            }
            StopMode::Kill => self.vm.kill().await?,
        }
        if let Some(lease) = &self.network {
            if let Err(e) = lease.remove_link().await {
                tracing::warn!(env = %self.id, "removing the VM's tap: {e:#}");
            }
        }
        self.clean_up()
    }

    fn console_log(&self) -> Option<&Path> {
        Some(&self.console)
    }

    fn freezer(&self) -> Option<Arc<dyn Freezer>> {
        Some(self.vm.freezer())
    }

    /// Pauses the VM, saves it into its staging folder and publishes that as the
    /// function's snapshot, if this environment holds the right to take it.
    async fn snapshot(&mut self) -> anyhow::Result<Option<Duration>> {
        let Some(creation) = self.creation.take() else {
            return Ok(None);
        };
        let started = Instant::now();
        self.vm.snapshot(&creation.files()).await?;
        let files = creation.publish()?;
        let took = started.elapsed();
        tracing::info!(env = %self.id, snapshot = %files.state.display(), ?took, "SnapStart: snapshot taken");
        Ok(Some(took))
    }

    fn restored_at(&self) -> Option<Instant> {
        self.restored
    }

    fn guest_network(&self) -> Option<kindling_wire::GuestNetwork> {
        self.network.as_ref().map(Lease::guest_network)
    }

    /// Hypervisor start as the host saw it (for a restored VM: until it runs again);
    /// kernel start → init, and init → bootstrap, from init's console milestones (the
    /// guest's clock), which a restored VM does not have.
    fn start_phases(&self) -> StartPhases {
        let mut phases = vec![("Hypervisor Start", self.hypervisor_start)];
        phases.extend(self.vm.start_phases());
        let console = std::fs::read(&self.console).unwrap_or_default();
        let console = String::from_utf8_lossy(&console);
        if let Some(userspace) = console::userspace_at(&console) {
            phases.push(("Guest Boot", Duration::from_secs_f64(userspace)));
            if let Some(bootstrap) = console::bootstrap_started_at(&console) {
                phases.push((
                    "Guest Init",
                    Duration::from_secs_f64((bootstrap - userspace).max(0.0)),
                ));
            }
        }
        phases
    }
}
