//! The `kindling` backend: our own `kindling-vmm` on KVM, driven by a Firecracker-layout
//! config file. Its serial console goes to the console log; SIGTERM asks the guest to
//! shut down (Ctrl-Alt-Del through the i8042), as Firecracker's SendCtrlAltDel does.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

use anyhow::Context;
use async_trait::async_trait;
use serde_json::json;
use tokio::process::Child;

use crate::machine::{self, VmSpec};
use crate::{Backend, RunningVm};
use kindling_runtime_api::config::Hypervisor;

#[derive(Debug)]
pub struct KindlingVmm {
    /// The `kindling-vmm` executable.
    pub program: PathBuf,
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
        let mut cmd = machine::vm_command(&self.program, &spec.console_log)?;
        cmd.arg("--no-api").arg("--config-file").arg(&config);
        let vmm = machine::spawn(&mut cmd, "kindling-vmm")
            .context("build it with `cargo build --release`")?;
        Ok(Box::new(KindlingVm { vmm }))
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
        "machine-config": { "vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mib },
        "vsock": { "guest_cid": spec.guest_cid, "uds_path": spec.vsock_uds },
    })
}

struct KindlingVm {
    vmm: Child,
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
        self.vmm.wait().await
    }

    async fn kill(&mut self) -> io::Result<()> {
        machine::kill(&mut self.vmm).await.map(drop)
    }
}
