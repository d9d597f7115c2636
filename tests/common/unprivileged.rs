//! What the probe function's `identity` action must report in every isolation: the runtime
//! runs as Lambda's `sbx_user1051` (uid and gid 993), with no capability in any set,
//! `no_new_privs` and a seccomp filter that refuses (EPERM) even what the kernel allows an
//! unprivileged user (a user namespace, the session keyring, a vsock socket), and can write
//! only `/tmp` and `/dev/shm` (not `/var/task`, `/opt`, the runtime's folder or the root);
//! and that init and the agent, which stay root, keep only the capabilities they use.

use serde_json::{json, Value};

/// Checks the probe's answer; the error names what differs.
pub fn check_unprivileged(answer: &Value) -> Result<(), String> {
    let none = "0000000000000000";
    let expected = json!({
        "status": {
            "Uid": "993 993 993 993", "Gid": "993 993 993 993", "Groups": "993",
            "CapInh": none, "CapPrm": none, "CapEff": none, "CapBnd": none, "CapAmb": none,
            "NoNewPrivs": "1", "Seccomp": "2",
        },
        "denied": { "unshare_user_ns": 1, "keyctl": 1, "vsock_socket": 1 },
        "writable": {
            "/tmp": true, "/dev/shm": true, "/var/task": false, "/var/runtime": false, "/opt": false,
            "/": false,
        },
    });
    for key in ["status", "denied", "writable"] {
        if answer[key] != expected[key] {
            return Err(format!(
                "the runtime's {key}: {}\nexpected: {}",
                answer[key], expected[key]
            ));
        }
    }
    Ok(())
}

/// Checks what the probe's `identity` action saw of init (PID 1) and of the one agent:
/// exactly the capabilities each keeps after the boot (see `init/src/privileges.rs` and
/// `kindling_plumbing::privileges`), nothing inheritable or ambient.
pub fn check_guest_privileges(answer: &Value, in_microvm: bool) -> Result<(), String> {
    let none = "0000000000000000";
    // KILL, SETGID, SETUID, SETPCAP; in a microVM also NET_ADMIN, SYS_ADMIN, SYS_TIME.
    let agent = if in_microvm {
        "00000000022011e0"
    } else {
        "00000000000001e0"
    };
    // DAC_OVERRIDE, KILL; in a microVM also SYS_ADMIN and SYS_BOOT.
    let init = if in_microvm {
        "0000000000600022"
    } else {
        "0000000000000022"
    };
    let expected = json!({
        "init": { "CapInh": none, "CapPrm": init, "CapEff": init, "CapBnd": agent, "CapAmb": none },
        "agents": [{ "CapInh": none, "CapPrm": agent, "CapEff": agent, "CapBnd": agent, "CapAmb": none }],
    });
    if answer["guest"] != expected {
        return Err(format!(
            "init's and the agent's capabilities: {}\nexpected: {}",
            answer["guest"], expected
        ));
    }
    Ok(())
}
