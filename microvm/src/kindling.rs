//! The `kindling` backend: our own `kindling-vmm` on KVM, configured and started over its
//! Firecracker-compatible API socket (which then pauses and resumes it between
//! invocations). Its serial console goes to the console log; SIGTERM asks the guest to
//! shut down (Ctrl-Alt-Del through the i8042), as Firecracker's SendCtrlAltDel does.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::Child;

use crate::machine::{self, VmSpec};
use crate::{Backend, RunningVm};
use kindling_runtime_api::config::Hypervisor;
use kindling_runtime_api::environment::Freezer;

/// How long kindling-vmm may take to open its API socket.
const API_PATIENCE: Duration = Duration::from_secs(10);

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
        let api = Api(spec.work_dir.join("api.sock"));
        let mut cmd = machine::vm_command(&self.program, &spec.console_log)?;
        cmd.arg("--api-sock").arg(&api.0);
        // Killed on drop, should the start below fail.
        let mut vmm = machine::spawn(&mut cmd, "kindling-vmm")
            .context("build it with `cargo build --release`")?;
        machine::wait_for_path(&api.0, &mut vmm, "kindling-vmm", API_PATIENCE).await?;
        api.start(&firecracker_config(spec))
            .await
            .context("configuring and starting the VM over kindling-vmm's API")?;
        Ok(Box::new(KindlingVm {
            vmm,
            api: Arc::new(api),
        }))
    }
}

/// The VM in Firecracker's `--config-file` layout, whose sections are also the bodies of
/// the API's `PUT`s.
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
    api: Arc<Api>,
}

/// The `PUT`s that configure and start a VM of `config` ([`firecracker_config`]), as
/// Firecracker's clients send them: each section, each drive, then InstanceStart.
fn start_requests(config: &Value) -> Vec<(String, Value)> {
    let mut requests: Vec<(String, Value)> = ["boot-source", "machine-config", "vsock"]
        .into_iter()
        .map(|section| (format!("/{section}"), config[section].clone()))
        .collect();
    for drive in config["drives"].as_array().into_iter().flatten() {
        let id = drive["drive_id"].as_str().unwrap_or_default();
        requests.push((format!("/drives/{id}"), drive.clone()));
    }
    requests.push((
        "/actions".to_string(),
        json!({"action_type": "InstanceStart"}),
    ));
    requests
}

/// kindling-vmm's API socket. It serves one connection at a time: each request gets a
/// connection of its own.
struct Api(PathBuf);

impl Api {
    /// Configures and starts the VM (see [`start_requests`]).
    async fn start(&self, config: &Value) -> io::Result<()> {
        for (path, body) in start_requests(config) {
            self.request("PUT", &path, &body).await?;
        }
        Ok(())
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

    fn freezer(&self) -> Arc<dyn Freezer> {
        self.api.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Drive;

    /// The seam between the launcher and the VMM: the configuration `kindling serve` sends
    /// is what kindling-vmm reads and accepts, field for field, and each of its API
    /// requests is one kindling-vmm's API takes.
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

        use kindling_vmm::api::{request, ApiState};
        let (start, _) = std::sync::mpsc::channel();
        let mut api = ApiState::new(start);
        let requests = start_requests(&firecracker_config(&spec));
        let paths: Vec<&str> = requests.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/boot-source",
                "/machine-config",
                "/vsock",
                "/drives/root",
                "/drives/task",
                "/actions"
            ]
        );
        for (path, body) in &requests {
            let parsed = request::parse("PUT", path, body.to_string().as_bytes()).unwrap();
            if path != "/actions" {
                assert_eq!(api.handle(parsed).status, 204, "PUT {path} {body}");
            }
        }
    }
}
