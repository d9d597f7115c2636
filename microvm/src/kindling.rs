//! The `kindling` backend: our own `kindling-vmm` on KVM, driven by a Firecracker-layout
//! config file, always started through `kindling-jailer`: in a chroot holding only the
//! VM's files, in namespaces of its own, as the VM's unprivileged user (see
//! [`jailer_args`]). Its serial console goes to the capped console log; SIGTERM (which the
//! jailer forwards) asks the guest to shut down (Ctrl-Alt-Del through the i8042), as
//! Firecracker's SendCtrlAltDel does.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

use anyhow::Context;
use async_trait::async_trait;
use serde_json::json;
use tokio::process::Child;

use crate::machine::{self, VmSpec};
use crate::{console, Backend, RunningVm};
use kindling_runtime_api::config::Hypervisor;

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
        // The VMM's messages go beside its console, as before it was jailed.
        let (console, capture) = console::capture(&spec.console_log, console::LOG_CAP)?;
        let mut cmd = machine::vm_command(&self.jailer, console.try_clone()?, console, None)?;
        cmd.args(self.jailer_args(spec, &config))
            .arg("--")
            .arg("--no-api")
            .arg("--config-file")
            .arg(&config);
        let vmm = machine::spawn(&mut cmd, "kindling-jailer")
            .context("build it with scripts/build-guest.sh")?;
        Ok(Box::new(KindlingVm {
            vmm,
            console: capture,
        }))
    }
}

impl KindlingVmm {
    /// The jail of one VM: its chroot under the environment's folder (removed with it), the
    /// VM's user, and, each at its own path, the boot files and drives (read-only unless the
    /// drive is writable), the config, and the socket folder (read-write: the VMM makes its
    /// vsock socket there and reaches the host's Runtime API socket linked into it). The
    /// network namespace is new and empty: the VM has no network device.
    fn jailer_args(&self, spec: &VmSpec, config: &std::path::Path) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--id".into(),
            format!("vm-{}", spec.user.uid).into(),
            "--exec-file".into(),
            self.program.clone().into(),
            "--uid".into(),
            spec.user.uid.to_string().into(),
            "--gid".into(),
            spec.user.gid.to_string().into(),
            "--chroot-base-dir".into(),
            spec.work_dir.clone().into(),
        ];
        let files = [spec.kernel.as_path(), &spec.initramfs, config]
            .into_iter()
            .map(|path| (path, false))
            .chain(spec.drives.iter().map(|d| (d.path.as_path(), !d.read_only)));
        for (path, writable) in files {
            args.push(if writable { "--bind-rw" } else { "--bind" }.into());
            args.push(path.into());
        }
        args.push("--bind-rw".into());
        args.push(spec.socket_dir.clone().into());
        args
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
    /// The jailer, which stands for the jailed VMM.
    vmm: Child,
    console: console::Capture,
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
    }
}
