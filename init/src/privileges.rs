//! What init keeps once the machine is set up. Mounts, kernel modules, `switch_root`, the
//! boot-timer write, the network, rlimits and the workload cgroup need nearly every
//! capability; after them init only supervises the agent and, at the end, shuts down. So,
//! right before the agent starts, init trims its own sets to [`INIT_IN_MICROVM`] or
//! [`INIT_IN_SANDBOX`], and its bounding set, all that the agent it starts (and restarts)
//! can ever have, to the agent's own set: `MKNOD`, `SYS_MODULE`, `SYS_RAWIO`,
//! `SYS_PTRACE`, `SYS_CHROOT`, `NET_RAW`, `DAC_OVERRIDE`, … are gone from all that it starts for
//! good, and most of them from init too.

use anyhow::{Context, Result};
use kindling_plumbing::privileges::{
    keep_only, Capabilities, Capability, AGENT_IN_MICROVM, AGENT_IN_SANDBOX,
};

/// What init keeps in a namespace sandbox, after the boot:
/// - `KILL`: the last SIGTERM and SIGKILL to every process (`kill(-1)`), the runtime's,
///   which runs as another user, included;
/// - `DAC_OVERRIDE`: removing the workload cgroup at the end, from a cgroup2 root
///   directory that is read-only (0555) even to its owner.
///
/// No `SYS_ADMIN`: the sandbox's mounts end with its mount namespace, so init unmounts
/// nothing there; without it, neither init nor the agent can mount anything in the
/// sandbox's namespaces.
pub const INIT_IN_SANDBOX: Capabilities =
    Capabilities::of(&[Capability::Kill, Capability::DacOverride]);

/// What init keeps in a microVM, after the boot: [`INIT_IN_SANDBOX`], `SYS_ADMIN` for
/// unmounting what it mounted and `SYS_BOOT` for the reboot(2) that powers the VM off,
/// at the end.
pub const INIT_IN_MICROVM: Capabilities = INIT_IN_SANDBOX.union(Capabilities::of(&[
    Capability::SysAdmin,
    Capability::SysBoot,
]));

/// Trims init's capabilities for the rest of its life. Init is one thread, and
/// capabilities belong to each thread: nothing is left with more.
pub fn keep_only_what_is_left(sandbox: bool) -> Result<()> {
    let (own, agent) = if sandbox {
        (INIT_IN_SANDBOX, AGENT_IN_SANDBOX)
    } else {
        (INIT_IN_MICROVM, AGENT_IN_MICROVM)
    };
    keep_only(agent, own).context("trim init's capabilities")
}
