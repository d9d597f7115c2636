//! The runtime's credentials. The function's runtime, and everything it starts, runs as an
//! unprivileged user (Lambda's `sbx_user1051`, uid 993, unless init says otherwise) with
//! every capability set empty — effective, permitted, inheritable, ambient and bounding —
//! and `no_new_privs`, so that no set-uid binary or file capability gives any of it back,
//! and under the seccomp denylist ([`kindling_plumbing::seccomp`]: what Docker's default
//! profile refuses a container, and vsock sockets). The agent itself stays root: it moves
//! the runtime into its cgroup and sets the clock.

use std::io;

use kindling_wire::RuntimeUser;

/// Drops the calling process to `user` for good (see [`kindling_plumbing::privileges`]).
/// Called in the forked child before exec: async-signal-safe, allocates nothing.
pub fn drop_to(user: RuntimeUser) -> io::Result<()> {
    kindling_plumbing::privileges::drop_to(user.uid, user.gid)
}
