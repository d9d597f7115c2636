//! What the probe function's `identity` action must report in every isolation: the runtime
//! runs as Lambda's `sbx_user1051` (uid and gid 993), with no capability in any set,
//! `no_new_privs` and a seccomp filter that refuses (EPERM) even what the kernel allows an
//! unprivileged user (a user namespace, the session keyring, a vsock socket), and can write
//! only `/tmp` and `/dev/shm` (not `/var/task`, `/opt`, the runtime's folder or the root).

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
