//! The microVM environment: each function environment is a Linux guest booted from the
//! Kindling kernel, initramfs, the runtime's root image (`/dev/vda`, read-only) and the
//! function's code image (`/dev/vdb`, read-only). In the guest, init switch_roots into the
//! root image and starts bootstrap, which reaches the host's Runtime API over vsock
//! (CID 2, port 9001 → the host Unix socket `<uds_path>_9001`).
//!
//! Two hypervisor backends boot the same files the same way:
//! - [`kindling::KindlingVmm`] — our `kindling-vmm` on KVM, where the host's KVM can run a
//!   guest kernel;
//! - [`qemu::Qemu`] — QEMU's microvm machine, with KVM or, where KVM cannot boot a kernel
//!   (nested shadow-paging hosts, see ENVIRONMENT.md), TCG.

pub mod console;
pub mod guest_clock;
pub mod kindling;
mod launcher;
pub mod machine;
pub mod probe;
pub mod qemu;
mod serial_link;
pub mod snapstart;
pub mod working_set;

use kindling_runtime_api::config::Hypervisor;
use kindling_runtime_api::environment::Freezer;
use std::io;
use std::process::ExitStatus;
use std::sync::Arc;

use async_trait::async_trait;

pub use launcher::{BootFiles, ImageSource, MicroVmLauncher};
use machine::VmSpec;
use snapstart::SnapshotFiles;

/// A hypervisor backend that can boot a [`VmSpec`].
#[async_trait]
pub trait Backend: Send + Sync {
    /// Which hypervisor this is.
    fn kind(&self) -> Hypervisor;
    /// How it runs, for logs: `kindling`, `qemu/kvm`, `qemu/tcg`.
    fn name(&self) -> &'static str;
    async fn boot(&self, spec: &VmSpec) -> anyhow::Result<Box<dyn RunningVm>>;
    /// SnapStart: the program that writes and reads this backend's snapshots (part of a
    /// snapshot's key), or why this backend cannot take them.
    fn snapshots(&self) -> Result<&std::path::Path, String> {
        Err(format!("{} cannot snapshot its VMs", self.name()))
    }
    /// Starts the VM of `snapshot` running, instead of booting `spec`, which describes the
    /// VM the snapshot was taken of but for its own sockets, user and console.
    async fn restore(
        &self,
        _spec: &VmSpec,
        _snapshot: &SnapshotFiles,
    ) -> anyhow::Result<Box<dyn RunningVm>> {
        anyhow::bail!("{} cannot restore snapshots", self.name())
    }
}

/// The processes of one booted VM.
#[async_trait]
pub trait RunningVm: Send + Sync {
    fn is_running(&mut self) -> bool;
    /// Asks the guest to shut down cleanly (Ctrl-Alt-Del); returns at once.
    async fn request_shutdown(&mut self) -> io::Result<()>;
    /// Waits for the hypervisor to exit, then reaps its helpers. A helper the VM cannot
    /// run without that exits first ends the VM too, as an error saying so.
    async fn wait(&mut self) -> io::Result<ExitStatus>;
    /// Kills the hypervisor and its helpers, and reaps them.
    async fn kill(&mut self) -> io::Result<()>;
    /// Pauses and resumes the VM's vCPUs through the hypervisor's control socket.
    fn freezer(&self) -> Arc<dyn Freezer>;
    /// Pauses the VM, saves it into `into` (inside [`VmSpec::snapshot_dir`]) and lets it
    /// run on; its vsock connections are reset on the way.
    async fn snapshot(&mut self, _into: &SnapshotFiles) -> anyhow::Result<()> {
        anyhow::bail!("this hypervisor cannot snapshot its VMs")
    }
    /// The parts of its start the hypervisor timed (a restore's jail and snapshot load),
    /// for the environment's cold-start breakdown.
    fn start_phases(&self) -> kindling_runtime_api::environment::StartPhases {
        Vec::new()
    }
}
