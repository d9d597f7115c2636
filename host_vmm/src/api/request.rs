//! HTTP method + path + body → a typed API request, with Firecracker's fault messages.

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::config::{
    BootSourceConfig, DriveConfig, MachineConfig, NetworkInterfaceConfig, VsockConfig,
};
use crate::cpu_template::CpuTemplate;
use crate::snapshot::{CreateParams, LoadParams};

/// `PUT /actions` action types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Action {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PATCH /vm` states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmBody {
    state: VmState,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: Action,
}

/// One API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    GetInstance,
    GetVersion,
    GetMachineConfig,
    PutBootSource(BootSourceConfig),
    PutDrive(DriveConfig),
    PutNetworkInterface(NetworkInterfaceConfig),
    PutMachineConfig(MachineConfig),
    PutVsock(VsockConfig),
    PutCpuConfig(CpuTemplate),
    Action(Action),
    PatchVm(VmState),
    CreateSnapshot(CreateParams),
    LoadSnapshot(LoadParams),
}

fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    if bytes.is_empty() {
        return Err("The request body is empty.".into());
    }
    serde_json::from_slice(bytes).map_err(|e| {
        format!("An error occurred when deserializing the json body of a request: {e}.")
    })
}

/// Parses a request; `Err` is the fault message of a 400 answer.
pub fn parse(method: &str, path: &str, bytes: &[u8]) -> Result<ApiRequest, String> {
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("GET", [""]) => Ok(ApiRequest::GetInstance),
        ("GET", ["version"]) => Ok(ApiRequest::GetVersion),
        ("GET", ["machine-config"]) => Ok(ApiRequest::GetMachineConfig),
        ("PUT", ["boot-source"]) => body(bytes).map(ApiRequest::PutBootSource),
        ("PUT", ["machine-config"]) => body(bytes).map(ApiRequest::PutMachineConfig),
        ("PUT", ["vsock"]) => body(bytes).map(ApiRequest::PutVsock),
        ("PUT", ["cpu-config"]) if !bytes.is_empty() => {
            CpuTemplate::from_json(bytes, "PUT /cpu-config").map(ApiRequest::PutCpuConfig)
        }
        ("PUT", ["actions"]) => {
            body::<ActionBody>(bytes).map(|b| ApiRequest::Action(b.action_type))
        }
        ("PATCH", ["vm"]) => body::<VmBody>(bytes).map(|b| ApiRequest::PatchVm(b.state)),
        ("PUT", ["snapshot", "create"]) => body(bytes).map(ApiRequest::CreateSnapshot),
        ("PUT", ["snapshot", "load"]) => body(bytes).map(ApiRequest::LoadSnapshot),
        ("PUT", ["drives", id]) if !id.is_empty() => {
            let drive: DriveConfig = body(bytes)?;
            if drive.drive_id != *id {
                return Err("The id from the path does not match the id from the body!".into());
            }
            Ok(ApiRequest::PutDrive(drive))
        }
        ("PUT", ["drives"]) | ("PUT", ["drives", ""]) => Err("Missing drive id.".into()),
        ("PUT", ["network-interfaces", id]) if !id.is_empty() => {
            let iface: NetworkInterfaceConfig = body(bytes)?;
            if iface.iface_id != *id {
                return Err("The id from the path does not match the id from the body!".into());
            }
            Ok(ApiRequest::PutNetworkInterface(iface))
        }
        ("PUT", ["network-interfaces"]) | ("PUT", ["network-interfaces", ""]) => {
            Err("Missing iface id.".into())
        }
        _ => Err(format!(
            "Invalid request method and/or path: {method} {path}."
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_parses() {
        assert_eq!(parse("GET", "/", b""), Ok(ApiRequest::GetInstance));
        assert_eq!(parse("GET", "/version", b""), Ok(ApiRequest::GetVersion));
        assert_eq!(
            parse("GET", "/machine-config", b""),
            Ok(ApiRequest::GetMachineConfig)
        );
        let boot = parse(
            "PUT",
            "/boot-source",
            br#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#,
        );
        assert!(
            matches!(boot, Ok(ApiRequest::PutBootSource(b)) if b.kernel_image_path.to_str() == Some("/k"))
        );
        let mc = parse(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
        );
        assert!(
            matches!(mc, Ok(ApiRequest::PutMachineConfig(m)) if m.vcpu_count == 2 && m.mem_size_mib == 256)
        );
        let vs = parse(
            "PUT",
            "/vsock",
            br#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#,
        );
        assert!(matches!(vs, Ok(ApiRequest::PutVsock(v)) if v.guest_cid == 3));
        let d = parse(
            "PUT",
            "/drives/rootfs",
            br#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": false}"#,
        );
        assert!(matches!(d, Ok(ApiRequest::PutDrive(d)) if d.is_root_device));
        let net = parse(
            "PUT",
            "/network-interfaces/eth0",
            br#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}"#,
        );
        assert!(
            matches!(net, Ok(ApiRequest::PutNetworkInterface(n)) if n.host_dev_name == "tap0" && n.guest_mac.is_some())
        );
        let cpu = parse("PUT", "/cpu-config", br#"{"cpuid_modifiers": []}"#);
        assert!(matches!(cpu, Ok(ApiRequest::PutCpuConfig(_))));
        assert_eq!(
            parse("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#),
            Ok(ApiRequest::Action(Action::InstanceStart))
        );
        assert_eq!(
            parse("PUT", "/actions", br#"{"action_type": "SendCtrlAltDel"}"#),
            Ok(ApiRequest::Action(Action::SendCtrlAltDel))
        );
        assert_eq!(
            parse("PATCH", "/vm", br#"{"state": "Paused"}"#),
            Ok(ApiRequest::PatchVm(VmState::Paused))
        );
        assert_eq!(
            parse("PATCH", "/vm", br#"{"state": "Resumed"}"#),
            Ok(ApiRequest::PatchVm(VmState::Resumed))
        );
        let create = parse(
            "PUT",
            "/snapshot/create",
            br#"{"snapshot_type": "Full", "snapshot_path": "/s", "mem_file_path": "/m"}"#,
        );
        assert!(
            matches!(create, Ok(ApiRequest::CreateSnapshot(c)) if c.mem_file_path.to_str() == Some("/m"))
        );
        let load = parse(
            "PUT",
            "/snapshot/load",
            br#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}, "resume_vm": true}"#,
        );
        assert!(
            matches!(&load, Ok(ApiRequest::LoadSnapshot(l)) if l.resume_vm && l.validate() == Ok(std::path::Path::new("/m")))
        );
    }

    #[test]
    fn snapshot_bodies_kindling_cannot_serve_are_refused() {
        let load = |b: &[u8]| match parse("PUT", "/snapshot/load", b) {
            Ok(ApiRequest::LoadSnapshot(l)) => l.validate().map(|p| p.to_path_buf()),
            other => panic!("{other:?}"),
        };
        assert!(load(br#"{"snapshot_path": "/s"}"#)
            .unwrap_err()
            .contains("Exactly one of mem_backend or mem_file_path"));
        assert!(load(
            br#"{"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#
        )
        .unwrap_err()
        .contains("Exactly one"));
        assert!(load(
            br#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}"#
        )
        .unwrap_err()
        .contains("Only the File memory backend"));
        assert!(load(
            br#"{"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": true}"#
        )
        .unwrap_err()
        .contains("Diff snapshots"));
        assert_eq!(
            load(br#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#),
            Ok("/m".into())
        );
        assert!(
            parse("PUT", "/snapshot/create", br#"{"snapshot_path": "/s"}"#)
                .unwrap_err()
                .contains("missing field `mem_file_path`")
        );
        assert!(parse("PUT", "/snapshot/take", b"{}")
            .unwrap_err()
            .contains("Invalid request"));
    }

    #[test]
    fn bad_requests_get_fault_messages() {
        let fault = |m: &str, p: &str, b: &[u8]| parse(m, p, b).unwrap_err();
        assert!(
            fault("GET", "/nope", b"").contains("Invalid request method and/or path: GET /nope.")
        );
        assert!(fault("DELETE", "/boot-source", b"").contains("Invalid request method"));
        assert!(fault("PUT", "/boot-source", b"").contains("body is empty"));
        assert!(fault("PUT", "/boot-source", b"{").contains("deserializing"));
        assert!(fault(
            "PUT",
            "/boot-source",
            br#"{"kernel_image_path": "/k", "x": 1}"#
        )
        .contains("unknown field `x`"));
        assert!(fault(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": "two", "mem_size_mib": 1}"#
        )
        .contains("invalid type"));
        assert!(fault("PUT", "/machine-config", br#"{"vcpu_count": 1}"#)
            .contains("missing field `mem_size_mib`"));
        assert!(
            fault("PUT", "/actions", br#"{"action_type": "Reboot"}"#).contains("unknown variant")
        );
        assert!(fault(
            "PUT",
            "/drives/a",
            br#"{"drive_id": "b", "path_on_host": "/r", "is_root_device": false}"#
        )
        .contains("does not match"));
        assert!(fault("PUT", "/drives/", b"{}").contains("Missing drive id"));
        assert!(fault(
            "PUT",
            "/network-interfaces/eth1",
            br#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#
        )
        .contains("does not match"));
        assert!(fault("PUT", "/network-interfaces", b"{}").contains("Missing iface id"));
        assert!(fault(
            "PUT",
            "/network-interfaces/eth0",
            br#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "nope"}"#
        )
        .contains("invalid MAC address"));
        assert!(fault("PATCH", "/vm", br#"{"state": "Frozen"}"#).contains("unknown variant"));
        assert!(fault("PATCH", "/vm", b"").contains("body is empty"));
        assert!(fault("PUT", "/vm", br#"{"state": "Paused"}"#).contains("Invalid request"));
        assert!(fault("PUT", "/cpu-config", br#"{"cpuid_modifiers": 1}"#)
            .contains("invalid CPU template"));
        assert!(
            fault("PUT", "/vsock", br#"{"guest_cid": -1, "uds_path": "/v"}"#)
                .contains("invalid value")
        );
    }
}
