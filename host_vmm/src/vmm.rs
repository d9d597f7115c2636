//! From a validated [`VmmConfig`] to a VM ready to start: memory, drives, vsock, kernel.

use std::path::Path;

use crate::boot::{self, BootError};
use crate::config::{ConfigError, VmmConfig};
use crate::cpu::EntryPoint;
use crate::devices::serial::SerialOut;
use crate::virtio::block::Block;
use crate::vm::{Vm, VmConfig, VmError};

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
}

/// Builds the VM `config` describes and loads its kernel. Returns the VM (not yet running)
/// and the boot vCPU's entry point.
pub fn build_vm(config: &VmmConfig, serial: SerialOut) -> Result<(Vm, EntryPoint), BuildError> {
    config.validate()?;
    let boot = config
        .boot()
        .ok_or_else(|| ConfigError("boot-source is required to start the VM".into()))?;
    let mut vm = Vm::new(VmConfig {
        vcpu_count: config.machine_config.vcpu_count,
        mem_size_mib: config.machine_config.mem_size_mib,
        serial,
        cpu_template: config.cpu_template.clone(),
    })?;
    for drive in config.ordered_drives() {
        let block = Block::open(&drive.path_on_host, drive.is_read_only, &drive.drive_id)
            .map_err(|e| BuildError::Drive(drive.drive_id.clone(), e))?;
        vm.add_virtio_device(block)?;
    }
    if let Some(vsock) = &config.vsock {
        vm.add_vsock(u64::from(vsock.guest_cid), Path::new(&vsock.uds_path))?;
    }
    let entry = boot::load_linux(
        vm.memory(),
        &boot,
        &vm.virtio_cmdline(),
        config.machine_config.vcpu_count,
    )?;
    Ok((vm, entry))
}
