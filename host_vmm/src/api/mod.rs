//! The Firecracker-compatible REST API, for the subset Kindling supports: `PUT /boot-source`,
//! `PUT /drives/{id}`, `PUT /network-interfaces/{id}`, `PUT|GET /machine-config`,
//! `PUT /vsock`, `PUT /cpu-config`, `PUT /actions`, `PATCH /vm` (pause and resume),
//! `PUT /snapshot/create` and `PUT /snapshot/load` (full snapshots), `GET /` and
//! `GET /version`. Bodies, status codes
//! (204 on success, 400 with `{"fault_message": ...}` on error) follow Firecracker's swagger
//! so its clients work unchanged.
//!
//! [`request`] turns HTTP method/path/body into an [`ApiRequest`]; [`ApiState`] applies it to
//! the pending configuration (validating first, so a refused request changes nothing);
//! [`server`] speaks HTTP/1.1 on the Unix socket.

pub mod request;
pub mod server;

use std::sync::mpsc::{self, Sender};

use serde_json::json;

use crate::config::VmmConfig;
use crate::snapshot::{LoadParams, SnapshotType};
use crate::vm::VmControls;
use request::{Action, ApiRequest, VmState};

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<String>,
}

impl Response {
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    pub fn ok(body: serde_json::Value) -> Self {
        Self {
            status: 200,
            body: Some(body.to_string()),
        }
    }

    /// Firecracker's error shape.
    pub fn fault(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            body: Some(json!({ "fault_message": message.into() }).to_string()),
        }
    }
}

/// The VMM's answer to a start: the running VM's controls, or the fault message.
pub type StartReply = Result<VmControls, String>;
/// What the API asks the VMM thread to start, and where the outcome goes.
pub type StartRequest = (Start, Sender<StartReply>);

/// The two ways a VM starts.
#[derive(Debug)]
pub enum Start {
    /// InstanceStart: boot the configured VM.
    Boot(VmmConfig),
    /// `PUT /snapshot/load`.
    Restore(LoadParams),
}

const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";
const NOT_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";

/// The API's view of the VM: configuration until InstanceStart, then running.
#[derive(Debug)]
pub struct ApiState {
    config: VmmConfig,
    /// Set once the VM runs.
    running: Option<VmControls>,
    start: Sender<StartRequest>,
}

impl ApiState {
    /// `start` receives the configuration on InstanceStart.
    pub fn new(start: Sender<StartRequest>) -> Self {
        Self {
            config: VmmConfig::default(),
            running: None,
            start,
        }
    }

    /// The API of a VM already started from `config` (`--config-file` with `--api-sock`, as
    /// Firecracker allows): what remains is runtime control (pause, snapshots, Ctrl-Alt-Del).
    pub fn started(config: VmmConfig, running: VmControls, start: Sender<StartRequest>) -> Self {
        Self {
            config,
            running: Some(running),
            start,
        }
    }

    /// Applies one request.
    pub fn handle(&mut self, req: ApiRequest) -> Response {
        match req {
            ApiRequest::GetInstance => Response::ok(json!({
                "id": "anonymous-instance",
                "state": match &self.running {
                    None => "Not started",
                    Some(vm) if vm.vcpus.is_paused() => "Paused",
                    Some(_) => "Running",
                },
                "vmm_version": env!("CARGO_PKG_VERSION"),
                "app_name": "kindling-vmm",
            })),
            ApiRequest::GetVersion => {
                Response::ok(json!({ "firecracker_version": env!("CARGO_PKG_VERSION") }))
            }
            ApiRequest::GetMachineConfig => Response::ok(json!(self.config.machine_config)),
            ApiRequest::Action(Action::SendCtrlAltDel) => match &self.running {
                None => Response::fault("The microVM is not running."),
                Some(vm) if vm.ctrl_alt_del.press() => Response::no_content(),
                Some(_) => Response::fault(
                    "The guest's i8042 keyboard driver is not listening (boot it with i8042.dumbkbd)",
                ),
            },
            ApiRequest::CreateSnapshot(params) => match &self.running {
                None => Response::fault(NOT_BEFORE_START),
                Some(_) if params.snapshot_type == SnapshotType::Diff => {
                    Response::fault("Diff snapshots are not supported by kindling-vmm.")
                }
                Some(vm) => match vm.snapshotter.create(&params) {
                    Ok(()) => Response::no_content(),
                    Err(e) => Response::fault(format!("Failed to create the snapshot: {e}")),
                },
            },
            ApiRequest::LoadSnapshot(_) if self.running.is_some() => {
                Response::fault(NOT_AFTER_START)
            }
            ApiRequest::LoadSnapshot(_) if self.config != VmmConfig::default() => {
                Response::fault(
                    "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
                )
            }
            ApiRequest::LoadSnapshot(params) => match params.validate() {
                Ok(_) => self.start(Start::Restore(params), "Failed to load the snapshot"),
                Err(e) => Response::fault(e),
            },
            ApiRequest::PatchVm(state) => match (&self.running, state) {
                (None, _) => Response::fault(NOT_BEFORE_START),
                (Some(vm), VmState::Paused) => match vm.vcpus.pause() {
                    Ok(()) => Response::no_content(),
                    Err(e) => Response::fault(format!("Failed to pause the microVM: {e}")),
                },
                (Some(vm), VmState::Resumed) => {
                    vm.vcpus.resume();
                    Response::no_content()
                }
            },
            _ if self.running.is_some() => Response::fault(NOT_AFTER_START),
            ApiRequest::PutBootSource(b) => self.apply(b.validate(), |c| c.boot_source = Some(b)),
            ApiRequest::PutMachineConfig(m) => self.apply(m.validate(), |c| c.machine_config = m),
            ApiRequest::PutVsock(v) => self.apply(v.validate(), |c| c.vsock = Some(v)),
            ApiRequest::PutCpuConfig(t) => self.apply(Ok(()), |c| c.cpu_template = Some(t)),
            ApiRequest::PutDrive(d) => {
                let valid = d.validate().and_then(|()| {
                    let other_root = self
                        .config
                        .drives
                        .iter()
                        .any(|o| o.is_root_device && o.drive_id != d.drive_id);
                    if d.is_root_device && other_root {
                        Err(crate::config::ConfigError(
                            "A root block device already exists!".into(),
                        ))
                    } else {
                        Ok(())
                    }
                });
                self.apply(valid, |c| {
                    match c.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
                        Some(existing) => *existing = d,
                        None => c.drives.push(d),
                    }
                })
            }
            ApiRequest::PutNetworkInterface(iface) => {
                // The interfaces as they would be, checked together (ids, taps, MACs).
                let mut next = self.config.network_interfaces.clone();
                match next.iter_mut().find(|o| o.iface_id == iface.iface_id) {
                    Some(existing) => *existing = iface,
                    None => next.push(iface),
                }
                let valid = crate::config::check_interfaces(&next);
                self.apply(valid, |c| c.network_interfaces = next)
            }
            ApiRequest::Action(Action::InstanceStart) => self.instance_start(),
            ApiRequest::Action(Action::FlushMetrics) => {
                Response::fault("metrics are not configured")
            }
        }
    }

    fn apply(
        &mut self,
        valid: Result<(), crate::config::ConfigError>,
        change: impl FnOnce(&mut VmmConfig),
    ) -> Response {
        match valid {
            Ok(()) => {
                change(&mut self.config);
                Response::no_content()
            }
            Err(e) => Response::fault(e.0),
        }
    }

    fn instance_start(&mut self) -> Response {
        if let Err(e) = self.config.validate() {
            return Response::fault(e.0);
        }
        self.start(
            Start::Boot(self.config.clone()),
            "Failed to start the microVM",
        )
    }

    /// Hands `start` to the VMM thread and waits for the running VM.
    fn start(&mut self, start: Start, failed: &str) -> Response {
        let (tx, rx) = mpsc::channel();
        if self.start.send((start, tx)).is_err() {
            return Response::fault("the VMM is shutting down");
        }
        match rx.recv() {
            Ok(Ok(vm)) => {
                self.running = Some(vm);
                Response::no_content()
            }
            Ok(Err(e)) => Response::fault(format!("{failed}: {e}")),
            Err(_) => Response::fault("the VMM stopped before the microVM started"),
        }
    }
}
