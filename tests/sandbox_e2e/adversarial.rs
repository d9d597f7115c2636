//! The adversarial suite (issue 9): a hostile function inside a real sandbox and a hostile
//! caller of the real Invoke API each try what would take the host down or let them out,
//! and each attempt must fail safely with the error a user expects while the server
//! stays bounded. Under every flood the test prints the server's peak RSS and its peak
//! number of open fds (bounded figures, not timings) and asserts them.
//!
//! Elsewhere, already: a memory hog is `Runtime.OutOfMemory` (`failures.rs`); the
//! runtime's identity, seccomp denials and masked kernel views (`runtimes.rs`); the
//! Invoke API's timeouts and connection cap, measured (`runtime_api/tests/end_to_end.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kindling_runtime_api::client::{self, InvocationType, InvokeOptions};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::attacks::check_attacks;
use crate::gauge::{fds, rss_kib, Gauge, Peaks};
use crate::support::{json, prerequisites, FunctionDef, Server};

const PYTHON: &[&str] = &["/usr/bin/python3"];
/// What any flood may add to the server's resident memory, over its size before.
const RSS_HEADROOM_KIB: u64 = 64 << 10;

/// Starts watching the server through the flood `what`.
fn watch(server: &Server, what: &str) -> Gauge {
    Gauge::start(what, &[("the server", server.pid())])
}

/// Stops watching: the server's peaks, checked against the RSS bound every flood shares.
fn bounded(gauge: Gauge) -> Peaks {
    let peaks = gauge.finish().remove(0);
    if let Err(e) = peaks.within("a flood", RSS_HEADROOM_KIB) {
        panic!("{e}");
    }
    peaks
}

/// The probe function, with more time for the floods than the tests' default.
fn probe(timeout: u32) -> FunctionDef {
    let mut probe = FunctionDef::probe();
    probe.timeout = timeout;
    probe
}

/// A file on the host, outside any sandbox root, that no function may read.
fn host_secret(server: &Server) -> std::path::PathBuf {
    let secret = server.state_dir.with_file_name("host-secret");
    std::fs::write(&secret, "the host's secret").expect("writing the secret");
    secret
}

/// The environment's cgroup limits on the host, as the sandbox wrote them (cgroup v2's
/// files, or v1's memory and pids hierarchies').
fn host_limits(server: &Server) -> BTreeMap<String, String> {
    let dirs = server.cgroups();
    let limits: BTreeMap<String, String> = dirs
        .iter()
        .flat_map(|dir| {
            ["memory.max", "memory.limit_in_bytes", "pids.max"]
                .into_iter()
                .filter_map(move |file| {
                    let value = std::fs::read_to_string(dir.join(file)).ok()?;
                    Some((file.to_string(), value.trim().to_string()))
                })
        })
        .collect();
    assert_eq!(limits.len(), 2, "one memory and one pids limit: {dirs:?}");
    limits
}

/// From inside a real function, every way out of the sandbox and every way to loosen its
/// limits fails with the errno a user would expect, and the host's limits stay as set.
#[tokio::test]
async fn a_hostile_function_cannot_leave_or_loosen_its_sandbox() {
    let Some(bins) = prerequisites(PYTHON) else {
        return;
    };
    let server = Server::start(bins, &[probe(10)]);
    let secret = host_secret(&server);
    let warm = server.invoke("probe", &json!({})).await;
    assert_eq!(warm.status, 200, "{}", server.diagnostics());
    let limits = host_limits(&server);
    let ports = [server.addr.port(), 22];
    let event = json!({
        "action": "attacks",
        "host_file": secret,
        "host_ports": ports,
    });
    let answer = server.invoke("probe", &event).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    assert_eq!(answer.function_error, None, "{}", json(&answer));
    let attacks = json(&answer)["attacks"].clone();
    let attacks = attacks.as_object().expect("a table of attacks");
    let errno = |e: &Value| e.as_i64().and_then(|e| i32::try_from(e).ok()).unwrap_or(0);
    for (attack, got) in attacks {
        println!(
            "attack {attack:<55} {}",
            nix::errno::Errno::from_raw(errno(got))
        );
    }
    // Nothing succeeded: every attempt failed, most of them with the filter's EPERM.
    if let Err(e) = check_attacks(attacks, nix::errno::Errno::EACCES, &ports) {
        panic!("{e}");
    }
    // The host's view: limits unchanged, secret unread and intact.
    assert_eq!(host_limits(&server), limits);
    let memory = limits
        .get("memory.max")
        .or(limits.get("memory.limit_in_bytes"));
    assert_eq!(memory, Some(&(128u64 << 20).to_string()), "{limits:?}");
    assert_eq!(limits["pids.max"], "1024", "{limits:?}");
    assert_eq!(
        std::fs::read_to_string(&secret).unwrap(),
        "the host's secret"
    );
    // And the environment still serves.
    let next = server.invoke("probe", &json!({})).await;
    assert_eq!(next.status, 200, "{}", server.diagnostics());
    server.stop();
}

/// A function that floods its own environment — hundreds of MiB of logs, a fork bomb, a
/// full /tmp, garbage and idle connections on its Runtime API, its Runtime API connection
/// cut — fails at most its own invocation; the server's memory and fds stay bounded, and
/// the next invocation works.
#[tokio::test]
async fn floods_from_inside_a_function_leave_the_server_bounded() {
    let Some(bins) = prerequisites(PYTHON) else {
        return;
    };
    // The same code twice: `bomb` times out sooner.
    let mut bomb = probe(3);
    bomb.name = "bomb".into();
    let server = Server::start_with(bins, &[probe(20), bomb], &["--log-file-max-mib", "8"], &[]);
    let works = |answer: &client::InvokeResponse| {
        assert_eq!(answer.status, 200, "{}", server.diagnostics());
        assert_eq!(answer.function_error, None, "{}", json(answer));
    };
    works(&server.invoke("probe", &json!({})).await);

    // 600 MiB of prints (the issue's flood): the server keeps a tail, the log file stays
    // under its cap.
    let gauge = watch(&server, "600 MiB of logs from one invocation");
    let tail = InvokeOptions {
        log_tail: true,
        ..InvokeOptions::default()
    };
    let answer = server
        .invoke_with("probe", &json!({"action": "spew", "mib": 600}), &tail)
        .await;
    works(&answer);
    assert_eq!(json(&answer)["spewed_mib"], 600);
    let tail = answer.log_tail.expect("a log tail");
    assert!(tail.len() <= 4096, "a 4 KB tail: {} bytes", tail.len());
    bounded(gauge);
    let logs = server.state_dir.join("logs");
    let on_disk: u64 = std::fs::read_dir(&logs)
        .expect("the logs folder")
        .map(|e| e.expect("an entry").metadata().expect("its size").len())
        .sum();
    println!(
        "logs on disk after 600 MiB of prints: {} MiB",
        on_disk >> 20
    );
    assert!(on_disk <= 3 * (8 << 20), "{on_disk} bytes of logs on disk");

    // A fork bomb: the pids limit stops it, the timeout ends it with its environment.
    let gauge = watch(&server, "fork bomb");
    let answer = server.invoke("bomb", &json!({"action": "fork_bomb"})).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    assert_eq!(answer.function_error.as_deref(), Some("Unhandled"));
    // Its pids limit stops the forks; its memory limit (each python child holds a few
    // MiB) or its timeout ends it, and its environment with it.
    let error = json(&answer)["errorType"].clone();
    println!("fork bomb: {error}");
    assert!(
        error == "Sandbox.Timedout" || error == "Runtime.OutOfMemory",
        "{error}"
    );
    bounded(gauge);
    works(&server.invoke("bomb", &json!({})).await);

    // /tmp written full: its size (or the memory limit that its pages count against)
    // stops the writer, never the host.
    let gauge = watch(&server, "a full /tmp");
    let answer = server.invoke("probe", &json!({"action": "fill_tmp"})).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    let body = json(&answer);
    println!("fill /tmp: {body}");
    match answer.function_error {
        None => assert_eq!(body["fill_tmp"]["stopped"], "ENOSPC", "{body}"),
        Some(_) => assert_eq!(body["errorType"], "Runtime.OutOfMemory", "{body}"),
    }
    bounded(gauge);
    works(&server.invoke("probe", &json!({})).await);

    // Garbage, lies and idle connections on its own Runtime API.
    let gauge = watch(&server, "abuse of the Runtime API");
    let answer = server
        .invoke("probe", &json!({"action": "runtime_api_abuse"}))
        .await;
    works(&answer);
    let seen = json(&answer)["seen"].clone();
    println!("the Runtime API answered: {seen}");
    for case in ["garbage", "huge header", "bogus id"] {
        let line = seen[case].as_str().unwrap_or_default();
        assert!(
            line.is_empty() || line.starts_with("errno") || line.contains(" 4"),
            "{case}: {line:?}"
        );
    }
    bounded(gauge);
    works(&server.invoke("probe", &json!({})).await);

    // Its Runtime API connection shut down under it: this invocation may fail, not hang.
    let gauge = watch(&server, "the Runtime API connection cut");
    let answer = server
        .invoke("probe", &json!({"action": "cut_runtime_api"}))
        .await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    println!(
        "cut Runtime API: {:?} {}",
        answer.function_error,
        String::from_utf8_lossy(&answer.body)
    );
    bounded(gauge);
    works(&server.invoke("probe", &json!({})).await);
    server.stop();
}

/// One raw HTTP exchange: sends `request`, returns the status line (empty if the server
/// closed without one).
async fn exchange(server: &Server, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(server.addr).await.expect("connecting");
    // The server may answer and close before reading all of it.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.lines().next().unwrap_or_default().to_string()
}

/// Drops the streams that the server has closed (a read ends or fails at once); returns
/// how many are left open.
fn drop_closed(streams: &mut Vec<TcpStream>) -> usize {
    streams.retain(|stream| {
        let mut buffer = [0u8; 512];
        loop {
            match stream.try_read(&mut buffer) {
                Ok(0) => return false,
                // A refusal's 503: read on to its end.
                Ok(_) => continue,
                Err(e) => return e.kind() == std::io::ErrorKind::WouldBlock,
            }
        }
    });
    streams.len()
}

/// Waits (15 s at most) until the server has closed every one of `streams`.
async fn all_closed(what: &str, streams: &mut Vec<TcpStream>) {
    for _ in 0..150 {
        if drop_closed(streams) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: {} connections left open", streams.len());
}

/// An invocation request of `bytes` of payload for `function`.
fn invoke_request(function: &str, headers: &str, payload: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /2015-03-31/functions/{function}/invocations HTTP/1.1\r\nHost: x\r\n\
         Connection: close\r\n{headers}Content-Length: {}\r\n\r\n",
        payload.len()
    )
    .into_bytes();
    request.extend_from_slice(payload);
    request
}

/// Hostile callers of the Invoke API — thousands of idle connections, slowloris heads,
/// oversize and malformed requests, a flood of Event invocations — get clear refusals,
/// and the server's memory and fds stay bounded and come back afterwards.
#[tokio::test]
async fn hostile_callers_leave_the_server_bounded() {
    let Some(bins) = prerequisites(PYTHON) else {
        return;
    };
    let cap = 256;
    let server = Server::start_with(
        bins,
        &[probe(5)],
        &[
            "--max-connections",
            &cap.to_string(),
            "--keep-alive-timeout",
            "2",
            "--header-read-timeout",
            "2",
            "--event-queue-mib",
            "8",
        ],
        &[],
    );
    let pid = server.pid();
    let resting_fds = fds(pid);

    // 19,000 connections that never send a byte (the issue's storm was 20k; this
    // project's machines give a process at most 20,000 fds, and root there has no
    // CAP_SYS_RESOURCE to raise that): the cap holds (the server's fds say so), the rest
    // are refused (503, or closed past 64 refusals at once), and the idle ones are closed
    // after the keep-alive timeout.
    const STORM: u64 = 19_000;
    let fd_room = STORM + 512;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("RLIMIT_NOFILE");
    if soft < fd_room {
        setrlimit(Resource::RLIMIT_NOFILE, fd_room, hard.max(fd_room)).unwrap_or_else(|e| {
            panic!("the storm needs {fd_room} fds in this test (RLIMIT_NOFILE {soft}/{hard}): {e}")
        });
    }
    let gauge = watch(&server, "19,000 idle connections");
    let mut idle = Vec::new();
    for _ in 0..STORM {
        match TcpStream::connect(server.addr).await {
            Ok(stream) => idle.push(stream),
            Err(e) => panic!("connect: {e}"),
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peaks = bounded(gauge);
    assert!(
        peaks.fds <= resting_fds + cap + 64 + 16,
        "{} fds for a cap of {cap}",
        peaks.fds
    );
    // Those waiting in the listen backlog are served (and closed) as others close.
    all_closed("idle connections", &mut idle).await;
    crate::support::eventually("the server's fds back to rest", || {
        fds(pid) <= resting_fds + 2
    })
    .await;
    // And the memory the storm took is handed back (most of it: the allocator keeps a
    // little).
    let bound = peaks.before_kib + (peaks.rss_kib - peaks.before_kib) / 2;
    crate::support::eventually("the storm's memory handed back", || rss_kib(pid) <= bound).await;
    println!(
        "after the idle storm: server RSS {} MiB, fds {} (at rest {resting_fds})",
        rss_kib(pid) >> 10,
        fds(pid)
    );

    // Slowloris: 200 heads trickling one byte a second are cut at the header timeout.
    let gauge = watch(&server, "200 slowloris heads");
    let mut slow = Vec::new();
    for _ in 0..200 {
        slow.push(TcpStream::connect(server.addr).await.expect("connecting"));
    }
    for _ in 0..4 {
        for stream in &mut slow {
            let _ = stream.write_all(b"G").await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bounded(gauge);
    all_closed("slow heads", &mut slow).await;

    // Oversize and malformed requests: Lambda's refusals, and nothing kept.
    let gauge = watch(&server, "oversize and malformed requests");
    let big = vec![b'"'; 7 << 20];
    let too_big = exchange(&server, &invoke_request("probe", "", &big)).await;
    assert!(too_big.contains(" 413 "), "7 MiB request: {too_big:?}");
    let event = "X-Amz-Invocation-Type: Event\r\n";
    let too_big = exchange(
        &server,
        &invoke_request("probe", event, &vec![b' '; 2 << 20]),
    )
    .await;
    assert!(too_big.contains(" 413 "), "2 MiB event: {too_big:?}");
    let garbage = exchange(&server, b"\x16\x03\x01\x00\xff garbage\r\n\r\n").await;
    assert!(
        garbage.is_empty() || garbage.contains(" 400 "),
        "garbage: {garbage:?}"
    );
    let mut huge_head = b"GET /2015-03-31/functions HTTP/1.1\r\nX: ".to_vec();
    huge_head.extend(vec![b'a'; 1 << 20]);
    huge_head.extend_from_slice(b"\r\n\r\n");
    let huge_head = exchange(&server, &huge_head).await;
    assert!(
        huge_head.is_empty() || huge_head.contains(" 431 ") || huge_head.contains(" 400 "),
        "1 MiB header: {huge_head:?}"
    );
    // Not JSON: the runtime cannot read its event, a function error (Lambda itself
    // answers 400 InvalidRequestContentException before any runtime sees it).
    let options = InvokeOptions::default();
    let not_json = client::invoke(server.addr, "probe", "{not json", &options)
        .await
        .expect("an answer");
    println!(
        "invalid JSON: {} {:?} {}",
        not_json.status,
        not_json.function_error,
        String::from_utf8_lossy(&not_json.body)
    );
    assert!(
        not_json.status == 400 || not_json.function_error.as_deref() == Some("Unhandled"),
        "invalid JSON: {not_json:?}"
    );
    bounded(gauge);

    // 200 Event invocations of 5 MB each: all refused (the Event payload limit), and 200
    // of 1 MiB: accepted up to the queue's 8 MiB, the rest refused with 429; every one
    // accepted runs (each prints one line), none is dropped.
    let gauge = watch(&server, "200 x 5 MB + 200 x 1 MiB Events");
    let five_mb = Arc::new(invoke_request("probe", event, &vec![b' '; 5_000_000]));
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..10 {
        let sends: Vec<_> = (0..20)
            .map(|_| {
                let (addr, request) = (server.addr, five_mb.clone());
                tokio::spawn(async move {
                    let mut stream = TcpStream::connect(addr).await.expect("connecting");
                    let _ = stream.write_all(&request).await;
                    let mut answer = Vec::new();
                    let _ = stream.read_to_end(&mut answer).await;
                    String::from_utf8_lossy(&answer)
                        .split(' ')
                        .nth(1)
                        .unwrap_or("none")
                        .to_string()
                })
            })
            .collect();
        for send in sends {
            *statuses
                .entry(format!("5MB {}", send.await.expect("a send")))
                .or_default() += 1;
        }
    }
    let one_mib = format!(
        r#"{{"action":"sleep","seconds":1,"pad":"{}"}}"#,
        "p".repeat((1 << 20) - 64)
    );
    let options = InvokeOptions {
        invocation_type: InvocationType::Event,
        ..InvokeOptions::default()
    };
    for _ in 0..200 {
        let answer = client::invoke(server.addr, "probe", one_mib.clone(), &options)
            .await
            .expect("an Event invocation");
        *statuses
            .entry(format!("1MiB {}", answer.status.as_u16()))
            .or_default() += 1;
    }
    println!("Event answers: {statuses:?}");
    assert_eq!(statuses.get("5MB 413"), Some(&200), "{statuses:?}");
    let accepted = statuses.get("1MiB 202").copied().unwrap_or(0);
    let throttled = statuses.get("1MiB 429").copied().unwrap_or(0);
    assert!(accepted >= 1 && throttled >= 1, "{statuses:?}");
    assert_eq!(accepted + throttled, 200, "{statuses:?}");
    crate::support::eventually("every accepted event ran", || {
        server.log("probe").matches("sleeping 1 s").count() >= accepted
    })
    .await;
    bounded(gauge);
    assert_eq!(
        server.log("probe").matches("sleeping 1 s").count(),
        accepted,
        "an accepted event ran twice"
    );
    server.stop();
}
