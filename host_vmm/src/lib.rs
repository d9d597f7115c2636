//! Kindling's VMM: a compact KVM virtual machine monitor for Kindling guests, built on the
//! rust-vmm crates. One process runs one microVM.
//!
//! The pieces, bottom up: [`layout`] (the guest address map), [`memory`] (guest RAM),
//! [`bus`] (exit dispatch), [`devices`] (serial, i8042, boot timer), [`virtio`] (virtio-mmio,
//! block, net over a tap, vsock with Firecracker's hybrid Unix-socket backend), [`cpu`] and
//! [`cpu_template`] (64-bit vCPU state, CPUID), [`vcpu`] (the `KVM_RUN` thread), [`vm`] (the
//! assembled machine and its event loop), [`exit`] (why it stopped), [`boot`], [`mptable`]
//! and [`acpi`] (Linux boot and the platform tables), [`snapshot`] (save and restore),
//! [`config`] and [`api`] (Firecracker's config file and REST API), [`vmm`] (config or
//! snapshot → VM), [`signals`], [`seccomp`] and [`metrics`] (process plumbing).

pub mod acpi;
pub mod api;
pub mod boot;
pub mod bus;
pub mod config;
pub mod cpu;
pub mod cpu_template;
pub mod devices;
pub mod exit;
pub mod layout;
pub mod memory;
pub mod metrics;
pub mod mptable;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod vcpu;
pub mod virtio;
pub mod vm;
pub mod vmm;
