//! From a validated [`VmmConfig`] to a VM ready to start (memory, drives, network
//! interfaces, vsock, kernel), or from a snapshot to a VM ready to resume.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use crate::boot::{self, BootError};
use crate::config::{ConfigError, VmmConfig};
use crate::cpu::EntryPoint;
use crate::devices::serial::SerialOut;
use crate::metrics;
use crate::snapshot::{self, DeviceState, LoadParams, MicrovmState, SnapshotError};
use crate::virtio::block::Block;
use crate::virtio::net::{MacAddr, Net, Tap};
use crate::vm::{RunningVm, Vm, VmConfig, VmError};

/// Errors turning a configuration into a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("drive {0}: {1}")]
    Drive(String, std::io::Error),
    #[error("network interface {0}: {1}")]
    Net(String, std::io::Error),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// Builds the VM `config` describes and loads its kernel. Returns the VM (not yet running)
/// and the boot vCPU's entry point.
pub fn build_vm(config: &VmmConfig, serial: SerialOut) -> Result<(Vm, EntryPoint), BuildError> {
    config.validate()?;
    let boot = config
        .boot()
        .ok_or_else(|| ConfigError("boot-source is required to start the VM".into()))?;
    let mut taps = open_taps(
        config
            .network_interfaces
            .iter()
            .map(|i| (i.iface_id.as_str(), i.host_dev_name.as_str(), i.host_dev_fd)),
    )?;
    let mut vm = Vm::new(VmConfig {
        vcpu_count: config.machine_config.vcpu_count,
        mem_size_mib: config.machine_config.mem_size_mib,
        serial,
        cpu_template: config.cpu_template.clone(),
    })?;
    let started = Instant::now();
    for drive in config.ordered_drives() {
        let block = Block::open(&drive.path_on_host, drive.is_read_only, &drive.drive_id)
            .map_err(|e| BuildError::Drive(drive.drive_id.clone(), e))?;
        vm.add_virtio_device(block)?;
    }
    for iface in &config.network_interfaces {
        vm.add_net(new_net(&iface.iface_id, &mut taps, iface.guest_mac)?)?;
    }
    if let Some(vsock) = &config.vsock {
        vm.add_vsock(u64::from(vsock.guest_cid), Path::new(&vsock.uds_path))?;
    }
    metrics::record_phase("virtio_devices", started.elapsed());
    let started = Instant::now();
    let entry = boot::load_linux(
        vm.memory(),
        &boot,
        &vm.virtio_slots(),
        config.machine_config.vcpu_count,
    )?;
    metrics::record_phase("kernel_load", started.elapsed());
    Ok((vm, entry))
}

/// The tap of each `(iface_id, host_dev_name, host_dev_fd)`, by `iface_id`: every
/// inherited descriptor adopted before any tap is opened by name, so that a tap the VMM
/// opened itself is never taken for an inherited one (see [`Tap::adopt`]).
fn open_taps<'a>(
    interfaces: impl Iterator<Item = (&'a str, &'a str, Option<i32>)>,
) -> Result<HashMap<String, Tap>, BuildError> {
    let (inherited, by_name): (Vec<_>, Vec<_>) = interfaces.partition(|(_, _, fd)| fd.is_some());
    let mut taps = HashMap::new();
    for (iface_id, name, fd) in inherited.into_iter().chain(by_name) {
        let tap = match fd {
            Some(fd) => Tap::adopt(fd, name),
            None => Tap::open(name),
        };
        let tap = tap.map_err(|e| BuildError::Net(iface_id.to_owned(), e))?;
        taps.insert(iface_id.to_owned(), tap);
    }
    Ok(taps)
}

/// The network device `iface_id` over its tap from [`open_taps`].
fn new_net(
    iface_id: &str,
    taps: &mut HashMap<String, Tap>,
    mac: Option<MacAddr>,
) -> Result<Net, BuildError> {
    let net_err = |e| BuildError::Net(iface_id.to_owned(), e);
    let tap = taps
        .remove(iface_id)
        .ok_or_else(|| net_err(std::io::Error::other("no tap was opened for it")))?;
    Net::new(iface_id, tap, mac).map_err(net_err)
}

/// Rebuilds and starts the VM of the snapshot `params` names: memory mapped from its file,
/// devices reopened (the vsock socket at `vsock_override` if given, each tap by the name
/// or inherited descriptor `network_overrides` gives its interface, if any), vCPUs paused unless
/// `resume_vm`. `prepare` sees the VM before it starts (seccomp, signal handling).
pub fn restore_vm(
    params: &LoadParams,
    serial: SerialOut,
    prepare: impl FnOnce(&mut Vm) -> Result<(), VmError>,
    instance_start: Instant,
) -> Result<RunningVm, BuildError> {
    let started = Instant::now();
    let mem_file = params.validate().map_err(ConfigError)?;
    let state = MicrovmState::read(&params.snapshot_path)?;
    metrics::record_phase("snapshot_state_read", started.elapsed());
    for o in &params.network_overrides {
        let known = state
            .devices
            .virtio
            .iter()
            .any(|v| matches!(&v.device, DeviceState::Net(net) if net.iface_id == o.iface_id));
        if !known {
            return Err(ConfigError(format!(
                "network_overrides: the snapshot has no network interface {:?}",
                o.iface_id
            ))
            .into());
        }
    }
    let mut taps = open_taps(state.devices.virtio.iter().filter_map(|v| match &v.device {
        DeviceState::Net(net) => {
            let o = params
                .network_overrides
                .iter()
                .find(|o| o.iface_id == net.iface_id);
            Some(match o {
                Some(o) => (
                    net.iface_id.as_str(),
                    o.host_dev_name.as_str(),
                    o.host_dev_fd,
                ),
                None => (net.iface_id.as_str(), net.host_dev_name.as_str(), None),
            })
        }
        _ => None,
    }))?;
    let started = Instant::now();
    let memory = snapshot::map_memory(mem_file, state.machine, &params.prefetch)?;
    metrics::record_phase("guest_memory", started.elapsed());
    tracing::info!(
        "guest memory mapped from {} in {:?}, {} MiB of it read in at once (prefetch)",
        mem_file.display(),
        started.elapsed(),
        params.prefetch.iter().map(|r| r.len).sum::<u64>() >> 20
    );
    let mut vm = Vm::restore(
        VmConfig {
            vcpu_count: state.machine.vcpu_count,
            mem_size_mib: state.machine.mem_size_mib,
            serial,
            cpu_template: None,
        },
        memory,
        &state.devices,
    )?;
    let started = Instant::now();
    for saved in &state.devices.virtio {
        let slot = match &saved.device {
            DeviceState::Block(drive) => {
                let block = Block::from_state(drive)
                    .map_err(|e| BuildError::Drive(drive.drive_id.clone(), e))?;
                let slot = vm.restore_virtio_device(block, &saved.transport)?;
                (slot.base, slot.irq)
            }
            DeviceState::Net(net) => {
                let device = new_net(&net.iface_id, &mut taps, net.guest_mac)?;
                let slot = vm.restore_net(device, &saved.transport)?;
                (slot.base, slot.irq)
            }
            DeviceState::Vsock(vsock) => {
                let uds_path = params
                    .vsock_override
                    .as_ref()
                    .map_or(vsock.uds_path.as_path(), |o| o.uds_path.as_path());
                let slot = vm.restore_vsock(vsock.guest_cid, uds_path, &saved.transport)?;
                (slot.base, slot.irq)
            }
        };
        if slot != (saved.base, saved.irq) {
            return Err(SnapshotError::Inconsistent(format!(
                "a device saved at {:#x} (IRQ {}) lands at {:#x} (IRQ {})",
                saved.base, saved.irq, slot.0, slot.1
            ))
            .into());
        }
    }
    metrics::record_phase("virtio_devices", started.elapsed());
    prepare(&mut vm)?;
    Ok(vm.resume(&state.vm, &state.vcpus, params.resume_vm, instance_start)?)
}
