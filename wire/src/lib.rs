//! The wire between the host's Runtime API server and the in-guest bootstrap agent.
//!
//! The guest talks to the host with the public Lambda Runtime API (paths under
//! [`RUNTIME_PREFIX`]) plus a few Kindling extension endpoints under [`KINDLING_PREFIX`]
//! that carry what the public API has no place for: the function's configuration, the
//! runtime's log lines, per-invocation metrics and the death of the runtime process.
//! This crate holds only those shared names and types, so that `bootstrap` (a static guest
//! binary) depends on nothing of the host.
//!
//! | call (guest → host) | body | answer |
//! |---|---|---|
//! | `GET /kindling/v1/environment` | – | 200 [`FunctionEnvironment`] |
//! | `POST /kindling/v1/logs` | log text, one or more `\n`-terminated lines; header [`HEADER_REQUEST_ID`] when the lines belong to an invocation | 202 |
//! | `POST /kindling/v1/runtime/exit` | [`RuntimeExit`] | 202 |
//!
//! | `GET /kindling/v1/stream`, `Upgrade: kindling-frames/1` | – | 101, then [`frame`]s |
//!
//! The agent speaks HTTP to the host only until it has upgraded one connection to a
//! [`frame`] stream: from then on every call above (and every Runtime API call with a
//! body of known, small size) travels on that stream as one frame each way. A host that
//! does not know the upgrade answers 404 and the agent stays on HTTP; a guest that never
//! asks for it (a runtime or test harness talking to the host directly) is served as
//! before.
//!
//! Each invocation's [`InvocationReport`] rides on the relayed `/response` or `/error`
//! itself, as the header [`HEADER_INVOCATION_REPORT`]: one round trip less per invocation.
//! On a streamed `/response` ([`HEADER_RESPONSE_MODE`]) it is a trailer instead, taken
//! when the stream ends, so that its duration covers the whole stream.

pub mod frame;
pub mod mux;
pub mod quiet_stream;

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Version prefix of the public Lambda Runtime API.
pub const RUNTIME_PREFIX: &str = "/2018-06-01/runtime";
/// Prefix of Kindling's own guest → host extension endpoints.
pub const KINDLING_PREFIX: &str = "/kindling/v1";

pub const PATH_NEXT: &str = "/2018-06-01/runtime/invocation/next";
pub const PATH_INIT_ERROR: &str = "/2018-06-01/runtime/init/error";
pub const PATH_ENVIRONMENT: &str = "/kindling/v1/environment";
pub const PATH_LOGS: &str = "/kindling/v1/logs";
pub const PATH_RUNTIME_EXIT: &str = "/kindling/v1/runtime/exit";
/// `POST` a [`MemoryUse`]: the runtime's peak memory so far, while an invocation runs.
pub const PATH_MEMORY: &str = "/kindling/v1/memory";
/// `GET` with `Upgrade: `[`frame::PROTOCOL`]: turns the connection into a framed stream
/// (see [`frame`]).
pub const PATH_STREAM: &str = "/kindling/v1/stream";

/// `/2018-06-01/runtime/invocation/{id}/response`
pub fn path_response(request_id: &str) -> String {
    format!("{RUNTIME_PREFIX}/invocation/{request_id}/response")
}
/// `/2018-06-01/runtime/invocation/{id}/error`
pub fn path_error(request_id: &str) -> String {
    format!("{RUNTIME_PREFIX}/invocation/{request_id}/error")
}

pub const HEADER_REQUEST_ID: &str = "lambda-runtime-aws-request-id";
pub const HEADER_DEADLINE_MS: &str = "lambda-runtime-deadline-ms";
pub const HEADER_FUNCTION_ARN: &str = "lambda-runtime-invoked-function-arn";
pub const HEADER_TRACE_ID: &str = "lambda-runtime-trace-id";
pub const HEADER_CLIENT_CONTEXT: &str = "lambda-runtime-client-context";
pub const HEADER_COGNITO_IDENTITY: &str = "lambda-runtime-cognito-identity";
pub const HEADER_TENANT_ID: &str = "lambda-runtime-aws-tenant-id";
pub const HEADER_FUNCTION_ERROR_TYPE: &str = "lambda-runtime-function-error-type";
/// On a `/response`: `streaming` when its body is a stream (chunked, with the error
/// trailers below when it fails in mid-stream).
pub const HEADER_RESPONSE_MODE: &str = "lambda-runtime-function-response-mode";
/// Trailer of a failed stream: the base64 of its error JSON (with
/// [`HEADER_FUNCTION_ERROR_TYPE`] as the other trailer).
pub const HEADER_FUNCTION_ERROR_BODY: &str = "lambda-runtime-function-error-body";
/// Bootstrap → host, on the relayed `/response` or `/error`: that invocation's
/// [`InvocationReport`] as JSON (the runtime's own request never carries it).
pub const HEADER_INVOCATION_REPORT: &str = "kindling-invocation-report";
/// Host → bootstrap on `/next`: the host's clock (Unix epoch ms) when it handed out the
/// event. A guest clock may run behind or ahead of the host's (a microVM's clock starts
/// at its boot); bootstrap moves `Lambda-Runtime-Deadline-Ms` onto the guest's clock with
/// it, so that runtimes compute the remaining time right, and drops the header. In a
/// microVM, whose clock is its own, bootstrap first sets the clock to this time.
pub const HEADER_HOST_TIME_MS: &str = "kindling-host-time-ms";
/// Host → bootstrap on the first `/next` of an environment of a SnapStart function (the
/// one that took the snapshot, and every clone restored from it): fresh random bytes from
/// the host, hex-encoded. Clones share the guest kernel's random pool as it was at the
/// snapshot, so bootstrap mixes these in and forces a reseed of the kernel's CRNG before
/// the runtime sees the event, and drops the header.
pub const HEADER_ENTROPY: &str = "kindling-entropy";
/// Bytes of entropy in [`HEADER_ENTROPY`]: a whole ChaCha20 key.
pub const ENTROPY_BYTES: usize = 32;
/// Host → bootstrap on the first `/next` of a SnapStart microVM with a network (the one
/// that took the snapshot, and every clone restored from it): its own [`GuestNetwork`] as
/// JSON. Clones resume with the address, route and resolvers of the guest that took the
/// snapshot; bootstrap moves the interface onto this one's lease before the runtime sees
/// the event, and drops the header.
pub const HEADER_NETWORK: &str = "kindling-network";
/// Where init writes the resolvers' text when the image's `/etc/resolv.conf` is a file,
/// which it then covers with a read-only bind mount of this one: the file to rewrite.
pub const RESOLV_CONF_COPY: &str = "/run/resolv.conf";

/// `deadline_ms` (on the host's clock, which read `host_now_ms`) on a clock that now reads
/// `guest_now_ms`.
pub fn deadline_on_guest_clock(deadline_ms: u64, host_now_ms: u64, guest_now_ms: u64) -> u64 {
    let remaining = deadline_ms.saturating_sub(host_now_ms);
    guest_now_ms.saturating_add(remaining)
}

/// Largest response payload a runtime may post (the figure AWS's emulator enforces).
pub const MAX_RESPONSE_BYTES: usize = 6_291_556;
/// Largest synchronous invocation payload a caller may send (Lambda's limit).
pub const MAX_REQUEST_BYTES: usize = 6_291_456;

/// The port the host's Runtime API listens on, for the guest: vsock port, and the suffix
/// of the host Unix socket `<uds_path>_9001` (Firecracker's hybrid vsock convention).
pub const RUNTIME_API_PORT: u32 = 9001;
/// The vsock CID of the host.
pub const HOST_CID: u32 = 2;

/// The error JSON of the Runtime API and of function errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ErrorBody {
    #[serde(rename = "errorMessage", default)]
    pub error_message: String,
    #[serde(rename = "errorType", default)]
    pub error_type: String,
    #[serde(
        rename = "stackTrace",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub stack_trace: Option<Vec<String>>,
}

impl ErrorBody {
    pub fn new(error_type: impl Into<String>, error_message: impl Into<String>) -> Self {
        Self {
            error_message: error_message.into(),
            error_type: error_type.into(),
            stack_trace: None,
        }
    }
}

/// What the guest needs to know to start a function's runtime; served by the host at
/// [`PATH_ENVIRONMENT`], so one guest image serves every function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionEnvironment {
    pub function_name: String,
    pub function_version: String,
    pub memory_mb: u32,
    pub timeout_ms: u64,
    /// `provided`, `python`, `node`, ...
    pub runtime: String,
    /// `_HANDLER`, e.g. `app.handler`.
    pub handler: String,
    pub region: String,
    /// The account of the function's ARN (extensions' `register` answer names it).
    #[serde(default)]
    pub account_id: String,
    pub log_group_name: String,
    pub log_stream_name: String,
    /// `on-demand` or `snap-start` ([`INITIALIZATION_SNAP_START`]).
    pub initialization_type: String,
    /// The function's own variables (from its configuration), added to the reserved ones.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
}

/// One environment's side of its network link, as [`HEADER_NETWORK`] carries it (the same
/// facts as init's `net_*` and `nameservers` keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// The guest's interface.
    pub interface: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// The host's end of the link, the default route's next hop.
    pub gateway: Ipv4Addr,
    pub nameservers: Vec<Ipv4Addr>,
}

impl GuestNetwork {
    /// `/etc/resolv.conf`'s text naming [`Self::nameservers`].
    pub fn resolv_conf(&self) -> String {
        self.nameservers
            .iter()
            .map(|ns| format!("nameserver {ns}\n"))
            .collect()
    }
}

/// `bytes` as lowercase hex, as [`HEADER_ENTROPY`] carries them.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string; `None` when it is not one.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// [`FunctionEnvironment::initialization_type`] of a SnapStart function. Like Lambda, its
/// runtime gets no log group or stream name (they would name the environment that took
/// the snapshot in every clone): those two are empty.
pub const INITIALIZATION_SNAP_START: &str = "snap-start";

/// Metrics of one invocation, measured in the guest by bootstrap; travels as
/// [`HEADER_INVOCATION_REPORT`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InvocationReport {
    /// Event handed to the runtime → its response or error received.
    pub duration_ms: f64,
    /// Runtime process start → its first `/next`; only on the first invocation after an init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_duration_ms: Option<f64>,
    /// Peak memory of the runtime's process tree.
    pub max_memory_used_mb: u64,
    /// When the agent took the event from the host ([`monotonic_ns`] of the guest):
    /// with `result_in_ns`, the hops the host cannot see (`kindling serve --trace-hops`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_in_ns: Option<u64>,
    /// When the runtime's result reached the agent ([`monotonic_ns`] of the guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_in_ns: Option<u64>,
    /// When the agent's process started ([`monotonic_ns`] of the guest); only on the
    /// first invocation of an environment, with `init_duration_ms`: with
    /// `runtime_started_ns`, the agent's own start (`Agent Start` in `REPORT`), and in a
    /// sandbox, whose clock is the host's, init's start before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_started_ns: Option<u64>,
    /// When the agent started the runtime's process ([`monotonic_ns`] of the guest), where
    /// `init_duration_ms` starts; only with `agent_started_ns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_started_ns: Option<u64>,
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the per-hop stamps. A sandbox shares it
/// with the host, so its agent's stamps and the host's compare directly; a microVM's is its
/// own, and only differences of its stamps mean anything.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the call's duration, and
    // CLOCK_MONOTONIC always exists on Linux, so the call only writes into it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// The runtime's peak memory so far during invocation `request_id`, in MiB (as
/// [`InvocationReport::max_memory_used_mb`]): what the host's `REPORT` says of an invocation
/// it ends itself (a timeout), where it cannot see into the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryUse {
    pub request_id: String,
    pub max_memory_used_mb: u64,
}

/// The runtime process died; the invocation in flight (if any) fails with `Runtime.ExitError`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeExit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub out_of_memory: bool,
    /// Peak memory of the runtime's process tree up to its end, in MiB (as
    /// [`InvocationReport::max_memory_used_mb`]): the failed invocation's `REPORT` says it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_used_mb: Option<u64>,
}

impl RuntimeExit {
    /// The error a caller sees, worded like Lambda's.
    pub fn to_error(&self) -> ErrorBody {
        let how = match (self.exit_code, self.signal) {
            (_, Some(sig)) => format!("signal: {}", signal_name(sig)),
            (Some(code), None) => format!("exit status {code}"),
            (None, None) => "unknown exit".to_string(),
        };
        ErrorBody::new(
            if self.out_of_memory {
                "Runtime.OutOfMemory"
            } else {
                "Runtime.ExitError"
            },
            format!(
                "RequestId: {} Error: Runtime exited with error: {how}",
                self.request_id.as_deref().unwrap_or("")
            ),
        )
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        1 => "hangup".into(),
        2 => "interrupt".into(),
        6 => "aborted".into(),
        9 => "killed".into(),
        11 => "segmentation fault".into(),
        15 => "terminated".into(),
        other => format!("signal {other}"),
    }
}

/// Where the guest reaches the host's Runtime API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostAddr {
    /// `vsock://CID:PORT` — a microVM.
    Vsock { cid: u32, port: u32 },
    /// `unix:///path` — the namespace sandbox (the host socket is bind-mounted in).
    Unix(PathBuf),
    /// `virtio-port://NAME` — a microVM whose connections to the host are [`mux`] streams
    /// over the virtio-serial port of that name (QEMU SnapStart: vsock cannot migrate).
    VirtioPort(String),
}

impl Default for HostAddr {
    fn default() -> Self {
        HostAddr::Vsock {
            cid: HOST_CID,
            port: RUNTIME_API_PORT,
        }
    }
}

impl FromStr for HostAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| format!("{s:?}: expected vsock://CID:PORT"))?;
            let num = |v: &str| {
                v.parse::<u32>()
                    .map_err(|e| format!("{s:?}: bad number {v:?}: {e}"))
            };
            Ok(HostAddr::Vsock {
                cid: num(cid)?,
                port: num(port)?,
            })
        } else if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!("{s:?}: the socket path must be absolute"));
            }
            Ok(HostAddr::Unix(PathBuf::from(path)))
        } else if let Some(name) = s.strip_prefix("virtio-port://") {
            if name.is_empty() || name.contains('/') {
                return Err(format!("{s:?}: expected a port name without '/'"));
            }
            Ok(HostAddr::VirtioPort(name.to_string()))
        } else {
            Err(format!(
                "{s:?}: expected vsock://CID:PORT, unix:///PATH or virtio-port://NAME"
            ))
        }
    }
}

impl fmt::Display for HostAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostAddr::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            HostAddr::Unix(path) => write!(f, "unix://{}", path.display()),
            HostAddr::VirtioPort(name) => write!(f, "virtio-port://{name}"),
        }
    }
}

/// The environment variable through which init tells bootstrap where the host is.
pub const ENV_HOST_ADDR: &str = "KINDLING_HOST";

/// The environment variable through which init tells bootstrap whom the runtime runs as.
pub const ENV_RUNTIME_USER: &str = "KINDLING_RUNTIME_USER";

/// The user and group a function's runtime runs as: `UID:GID` (or `UID`, the group then the
/// same number). Numbers, not names: a root image needs no `/etc/passwd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeUser {
    pub uid: u32,
    pub gid: u32,
}

impl RuntimeUser {
    /// Lambda's `sbx_user1051`: uid and gid 993.
    pub const LAMBDA: RuntimeUser = RuntimeUser { uid: 993, gid: 993 };
}

impl FromStr for RuntimeUser {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let number = |n: &str| {
            n.parse::<u32>()
                .map_err(|_| format!("{s:?} is not UID or UID:GID (numbers)"))
        };
        let (uid, gid) = match s.split_once(':') {
            Some((uid, gid)) => (number(uid)?, number(gid)?),
            None => (number(s)?, number(s)?),
        };
        Ok(RuntimeUser { uid, gid })
    }
}

impl fmt::Display for RuntimeUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_addr_round_trips() {
        for s in [
            "vsock://2:9001",
            "unix:///run/kindling/host.sock",
            "virtio-port://kindling-host",
        ] {
            assert_eq!(s.parse::<HostAddr>().unwrap().to_string(), s);
        }
        assert!("vsock://2".parse::<HostAddr>().is_err());
        assert!("unix://relative".parse::<HostAddr>().is_err());
        assert!("tcp://1.2.3.4:5".parse::<HostAddr>().is_err());
        assert!("virtio-port://".parse::<HostAddr>().is_err());
        assert!("virtio-port://a/b".parse::<HostAddr>().is_err());
    }

    #[test]
    fn runtime_users_parse_as_numbers() {
        let user: RuntimeUser = "1000:100".parse().unwrap();
        assert_eq!((user.uid, user.gid), (1000, 100));
        assert_eq!(user.to_string(), "1000:100");
        assert_eq!("993".parse::<RuntimeUser>().unwrap(), RuntimeUser::LAMBDA);
        for bad in ["", "sbx_user1051", "1:", ":1", "-1", "1:2:3"] {
            assert!(bad.parse::<RuntimeUser>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(to_hex(&bytes), "0001abff");
        assert_eq!(from_hex("0001abff").unwrap(), bytes);
        assert_eq!(from_hex("0001ABFF").unwrap(), bytes);
        for bad in ["0", "zz", "0g", "é0"] {
            assert!(from_hex(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn deadlines_move_onto_the_guest_clock() {
        // Guest 2.6 s behind the host: the deadline moves 2.6 s earlier, keeping 3 s left.
        assert_eq!(deadline_on_guest_clock(10_000, 7_000, 4_400), 7_400);
        // Already past on the host: no time left on the guest either.
        assert_eq!(deadline_on_guest_clock(5_000, 7_000, 4_400), 4_400);
    }

    #[test]
    fn runtime_exit_reads_like_lambda() {
        let mut e = RuntimeExit {
            request_id: Some("r1".into()),
            exit_code: None,
            signal: Some(9),
            out_of_memory: false,
            max_memory_used_mb: Some(130),
        };
        let body = e.to_error();
        assert_eq!(body.error_type, "Runtime.ExitError");
        assert!(
            body.error_message.contains("signal: killed"),
            "{}",
            body.error_message
        );
        e.out_of_memory = true;
        assert_eq!(e.to_error().error_type, "Runtime.OutOfMemory");
    }
}
