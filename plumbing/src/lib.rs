//! The Linux plumbing that init, the bootstrap and the namespace sandbox share: cgroup
//! directories and control files ([`cgroup`]), `mkdir -p` with a mode ([`dirs`]) and the
//! escapes of the kernel's mount tables ([`mount_table`]), dropping root for good and the
//! capability sets init and the agent keep
//! ([`privileges`], which kindling-jailer shares too), the seccomp denylist of the
//! function's runtime and of every jailed program (`seccomp`, behind that feature), and
//! pools of host ids that running environments hold ([`ids`], for the microVM and sandbox
//! launchers), cheap cgroup migrations for the host that starts them
//! ([`favordynmods`]), and helpers that die with the host that spawned them ([`lifetime`]).
//!
//! Only std and nix (and the pure-Rust seccompiler): init and the bootstrap are linked
//! statically (`+crt-static`) into every guest. Each failure names the path it happened on ([`Error`]), so callers need
//! no wrapper of their own around each call.

pub mod cgroup;
pub mod dirs;
mod error;
pub mod favordynmods;
pub mod ids;
pub mod lifetime;
pub mod mount_table;
pub mod privileges;
#[cfg(feature = "seccomp")]
pub mod seccomp;

pub use error::{Error, Result};
