//! Credentials. The function's runtime, and everything it starts, runs as an unprivileged
//! user (Lambda's `sbx_user1051`, uid 993, unless init says otherwise) with every
//! capability set empty — effective, permitted, inheritable, ambient and bounding — and
//! `no_new_privs`, so that no set-uid binary or file capability gives any of it back, and
//! under the seccomp denylist ([`kindling_plumbing::seccomp`]: what Docker's default
//! profile refuses a container, and vsock sockets). The agent itself stays root but keeps
//! only the capabilities it uses ([`kindling_plumbing::privileges::AGENT_IN_MICROVM`] or
//! [`AGENT_IN_SANDBOX`](kindling_plumbing::privileges::AGENT_IN_SANDBOX)), from its start on.

use std::io;

use kindling_plumbing::privileges::{self, AGENT_IN_MICROVM, AGENT_IN_SANDBOX};
use kindling_wire::RuntimeUser;

/// Drops the calling process to `user` for good (see [`kindling_plumbing::privileges`]).
/// Called in the forked child before exec: async-signal-safe, allocates nothing.
pub fn drop_to(user: RuntimeUser) -> io::Result<()> {
    privileges::drop_to(user.uid, user.gid)
}

/// Trims the agent's own capabilities, and all that anything it starts could get, to what
/// it needs in a microVM or in the sandbox. It needs none of the others at any point: its
/// start (connecting to the host, listening on the Runtime API) takes no capability. An
/// agent that is not root (started by hand or by a test) has nothing to give up.
pub fn keep_only_the_agents(in_microvm: bool) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let keep = if in_microvm {
        AGENT_IN_MICROVM
    } else {
        AGENT_IN_SANDBOX
    };
    privileges::keep_only(keep, keep)
        .map_err(|e| format!("cannot trim the agent's capabilities: {e}"))
}
