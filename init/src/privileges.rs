//! What init keeps once the machine is set up. Mounts, kernel modules, `switch_root`, the
//! boot-timer write, the network, rlimits and the workload cgroup need nearly every
//! capability; after them init only supervises the agent and, at the end, shuts down. So,
//! right before the agent starts, init trims its own sets to [`INIT_IN_MICROVM`] or
//! [`INIT_IN_SANDBOX`], and its bounding set, all that the agent it starts (and restarts)
//! can ever have, to the agent's own set: `MKNOD`, `SYS_MODULE`, `SYS_RAWIO`,
//! `SYS_PTRACE`, `SYS_CHROOT`, `NET_RAW`, `DAC_OVERRIDE`, … are gone from all that it starts for
//! good, and most of them from init too.
//!
//! In the sandbox, where the host's kernel is the only wall, init first puts itself and
//! all it starts under the function's seccomp denylist: root of the sandbox's user
//! namespace, even without `CAP_SYS_ADMIN`, could otherwise make a user namespace of its
//! own and, with every capability there, reach the kernel's namespaced mount and cgroup
//! code (a cgroup v1 mount of its own cgroup, for one).

use anyhow::{Context, Result};
use kindling_plumbing::privileges::{
    keep_only, Capabilities, Capability, AGENT_IN_MICROVM, AGENT_IN_SANDBOX,
};
use kindling_plumbing::seccomp;

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
///
/// In the sandbox the denylist goes on first, while init still holds `CAP_SYS_ADMIN`
/// (seccomp(2) asks for it or for `no_new_privs`, and `no_new_privs` would cap what the
/// agent's exec grants it at init's own, smaller, set). After the boot init and the agent
/// need nothing it refuses: init unmounts nothing and exits instead of rebooting there,
/// and the agent talks to the host over a Unix socket.
pub fn keep_only_what_is_left(sandbox: bool) -> Result<()> {
    let (own, agent) = if sandbox {
        let filters = seccomp::denylist_filters().map_err(anyhow::Error::msg)?;
        seccomp::apply_as_namespace_admin(&filters).context("install the seccomp denylist")?;
        (INIT_IN_SANDBOX, AGENT_IN_SANDBOX)
    } else {
        (INIT_IN_MICROVM, AGENT_IN_MICROVM)
    };
    keep_only(agent, own).context("trim init's capabilities")
}
