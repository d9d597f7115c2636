//! The Invoke API and the scheduler end to end: a real [`Server`] on TCP, environments
//! that are real processes (`tests/fake_guest.py`) talking over the real Unix sockets.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::launcher::{have_python, Census, ProcessLauncher};
use kindling_runtime_api::client::{self, Client, InvocationType, InvokeOptions, InvokeResponse};
use kindling_runtime_api::logs::LogLine;
use kindling_runtime_api::{Function, Isolation, Launcher, Server, ServerOptions};
use serde_json::{json, Value};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

struct Harness {
    addr: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
    census: Arc<Census>,
    state: tempfile::TempDir,
    logs: broadcast::Receiver<LogLine>,
    _code: tempfile::TempDir,
}

fn function(name: &str, code: &std::path::Path) -> Function {
    Function {
        name: name.into(),
        code: code.to_path_buf(),
        runtime: "provided".into(),
        handler: "handler".into(),
        memory_mb: 128,
        timeout: Duration::from_secs(3),
        isolation: Isolation::Sandbox,
        max_concurrency: 10,
        env: BTreeMap::from([("GREETING".to_string(), "hi".to_string())]),
        snapstart: false,
        network: kindling_runtime_api::environment::Network::Outbound,
        layers: Vec::new(),
        credentials: None,
    }
}

/// Starts a server with the functions `make` returns; `None` (and one line saying why)
/// when python3 is missing.
async fn start(
    make: impl FnOnce(&std::path::Path) -> Vec<Function>,
    tune: impl FnOnce(&mut ServerOptions),
) -> Option<Harness> {
    if !have_python() {
        println!("SKIPPED: python3 is not installed; the fake guest needs it");
        return None;
    }
    let code = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let (launcher, census) = ProcessLauncher::new();
    let launchers = HashMap::from([(Isolation::Sandbox, Arc::new(launcher) as Arc<dyn Launcher>)]);
    let mut options = ServerOptions::new(state.path());
    options.invoke_addr = "127.0.0.1:0".parse().unwrap();
    options.shutdown_grace = Duration::from_secs(2);
    tune(&mut options);
    let server = Server::bind(make(code.path()), launchers, options)
        .await
        .unwrap();
    let addr = server.local_addr();
    let logs = server.logs();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Some(Harness {
        addr,
        stop,
        task,
        census,
        state,
        logs,
        _code: code,
    })
}

impl Harness {
    async fn invoke(&self, function: &str, payload: Value) -> InvokeResponse {
        client::invoke(
            self.addr,
            function,
            payload.to_string(),
            &InvokeOptions::default(),
        )
        .await
        .unwrap()
    }

    /// What `GET /metrics` shows now.
    async fn metrics(&self) -> String {
        let answer = Client::connect(self.addr)
            .await
            .unwrap()
            .get("/metrics")
            .await
            .unwrap();
        String::from_utf8_lossy(&answer.body).into_owned()
    }

    fn started(&self) -> usize {
        self.census.started.lock().unwrap().len()
    }

    /// Waits for a log line containing `needle`.
    async fn log_line(&mut self, needle: &str) -> String {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let line = self.logs.recv().await.unwrap();
                if line.text.contains(needle) {
                    return line.text;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no log line with {needle:?}"))
    }

    /// Shuts the server down and checks that nothing is left behind.
    async fn close(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the server did not stop")
            .unwrap()
            .unwrap();
        assert_eq!(
            self.census.running.load(Ordering::SeqCst),
            0,
            "environments left running"
        );
        for pid in self.census.started.lock().unwrap().iter() {
            assert!(!alive(*pid), "process {pid} outlived the server");
        }
        assert!(
            !self.state.path().join("envs").exists(),
            "environment directories left behind"
        );
    }
}

fn alive(pid: u32) -> bool {
    // A killed child is reaped by tokio; a zombie would still show, so look at its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn body(r: &InvokeResponse) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_api_answers_like_lambda() {
    let Some(mut h) = start(|code| vec![function("echo", code)], |_| {}).await else {
        return;
    };
    let mut c = Client::connect(h.addr).await.unwrap();
    let tail = InvokeOptions {
        log_tail: true,
        client_context: Some(r#"{"custom":{"a":"b"}}"#.into()),
        ..Default::default()
    };

    // Cold, with the log tail.
    let r = c.invoke("echo", r#"{"n":1}"#, &tail).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-amz-executed-version"], "$LATEST");
    assert_eq!(r.function_error, None);
    let b = body(&r);
    assert_eq!(b["echo"], json!({"n": 1}));
    assert_eq!(b["greeting"], "hi");
    assert_eq!(
        b["arn"],
        "arn:aws:lambda:us-east-1:000000000000:function:echo"
    );
    assert_eq!(b["clientContext"], r#"{"custom":{"a":"b"}}"#);
    assert!(b["trace"].as_str().unwrap().starts_with("Root=1-"));
    let id = b["requestId"].as_str().unwrap().to_string();
    assert_eq!(r.headers["x-amzn-requestid"], id.as_str());
    let log = r.log_tail.unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines[0], format!("START RequestId: {id} Version: $LATEST"));
    assert_eq!(lines[1], "handling 1 echo");
    assert_eq!(lines[2], format!("END RequestId: {id}"));
    assert!(
        lines[3].starts_with(&format!("REPORT RequestId: {id}\tDuration: ")),
        "{}",
        lines[3]
    );
    assert!(
        lines[3].contains("\tMemory Size: 128 MB\tMax Memory Used: 12 MB\tInit Duration: "),
        "{}",
        lines[3]
    );

    // Warm: no Init Duration; the same environment.
    let r2 = c.invoke("echo", r#"{"n":2}"#, &tail).await.unwrap();
    assert_eq!(body(&r2)["pid"], b["pid"]);
    assert!(!r2.log_tail.unwrap().contains("Init Duration"));

    // The emulator's alias, when one function is loaded.
    let r = c
        .invoke("function", r#"{"n":3}"#, &InvokeOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), body(&r)["echo"]["n"].as_i64()),
        (200, Some(3))
    );

    // A function error: 200, X-Amz-Function-Error, the runtime's error JSON.
    let r = c
        .invoke("echo", r#"{"action":"error"}"#, &InvokeOptions::default())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.function_error.as_deref(), Some("Unhandled"));
    assert_eq!(body(&r)["errorType"], "ValueError");
    assert_eq!(r.headers["x-amz-executed-version"], "$LATEST");

    // 7 MiB answered by the function.
    let r = c
        .invoke(
            "echo",
            json!({"action": "big", "bytes": 7 << 20}).to_string(),
            &InvokeOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.function_error.as_deref()),
        (200, Some("Unhandled"))
    );
    assert_eq!(body(&r)["errorType"], "Function.ResponseSizeTooLarge");

    // DryRun and Event.
    let dry = InvokeOptions {
        invocation_type: InvocationType::DryRun,
        ..Default::default()
    };
    let r = c.invoke("echo", "{}", &dry).await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.len()), (204, 0));
    let event = InvokeOptions {
        invocation_type: InvocationType::Event,
        ..Default::default()
    };
    let r = c.invoke("echo", r#"{"n":77}"#, &event).await.unwrap();
    assert_eq!(r.status, 202);
    h.log_line("handling 77 echo").await;

    // Unknown function, oversized request, bad headers, unknown path.
    let r = c
        .invoke("nope", "{}", &InvokeOptions::default())
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.headers["x-amzn-errortype"], "ResourceNotFoundException");
    assert_eq!(
        body(&r),
        json!({"Type": "User", "Message": "Function not found: arn:aws:lambda:us-east-1:000000000000:function:nope"})
    );
    let r = c
        .invoke(
            "echo",
            vec![b'x'; kindling_wire::MAX_REQUEST_BYTES + 1],
            &InvokeOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(
        r.headers["x-amzn-errortype"],
        "RequestEntityTooLargeException"
    );
    assert_eq!(
        body(&r)["message"],
        "Request must be smaller than 6291456 bytes for the InvokeFunction operation"
    );
    let mut raw = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let a = common::request(
        &mut raw,
        "POST",
        "/2015-03-31/functions/echo/invocations",
        &[("X-Amz-Invocation-Type", "Sometimes")],
        b"{}",
    )
    .await;
    assert_eq!(
        (a.status, a.header("x-amzn-errortype")),
        (400, Some("InvalidParameterValueException"))
    );
    let a = common::request(
        &mut raw,
        "POST",
        "/2015-03-31/functions/echo/invocations",
        &[("X-Amz-Client-Context", "%%%")],
        b"{}",
    )
    .await;
    assert_eq!(
        (a.status, a.header("x-amzn-errortype")),
        (400, Some("InvalidRequestContentException"))
    );
    let a = common::request(&mut raw, "GET", "/2015-03-31/nothing", &[], b"").await;
    assert_eq!(a.status, 404);
    let mut garbage = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut garbage, b"\x16\x03\x01 not http at all\r\n\r\n")
        .await
        .unwrap();
    if let Some(a) = common::read_answer(&mut garbage).await {
        assert_eq!(a.status, 400);
    }

    // Metrics.
    let m = c.get("/metrics").await.unwrap();
    assert_eq!(m.status, 200);
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    for want in [
        "kindling_invocations_total{function=\"echo\"} 6",
        "kindling_errors_total{function=\"echo\"} 2",
        "kindling_cold_starts_total{function=\"echo\"} 1",
        "kindling_cold_start_seconds_count{function=\"echo\"} 1",
        "kindling_init_seconds_count{function=\"echo\"} 1",
        "kindling_duration_seconds_count{function=\"echo\"} 6",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
    assert!(text.contains("# TYPE kindling_timeouts counter"), "{text}");
    drop(c);
    h.close().await;
}

/// Every name the SDKs send (percent-encoded as they send it) reaches the function;
/// what Lambda refuses is refused with its status, type and message, and a qualifier
/// that Kindling cannot serve is never run as `$LATEST`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_arns_and_qualifiers_like_lambda() {
    let Some(h) = start(|code| vec![function("echo", code)], |_| {}).await else {
        return;
    };
    let post = |path: String| async move {
        let mut raw = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let path = format!("/2015-03-31/functions/{path}");
        common::request(&mut raw, "POST", &path, &[], br#"{"n":5}"#).await
    };
    let arn = "arn:aws:lambda:us-east-1:000000000000:function:echo";
    for path in [
        "echo%3A%24LATEST/invocations".to_string(),
        "echo:$LATEST/invocations".to_string(),
        "123456789012%3Afunction%3Aecho/invocations".to_string(),
        "arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Afunction%3Aecho/invocations".to_string(),
        format!("{arn}:$LATEST/invocations"),
        "echo/invocations?Qualifier=%24LATEST".to_string(),
        "echo%3A%24LATEST/invocations?Qualifier=%24LATEST".to_string(),
    ] {
        let a = post(path.clone()).await;
        assert_eq!(
            a.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&a.body)
        );
        assert_eq!(a.json()["echo"], json!({"n": 5}), "{path}");
        assert_eq!(a.json()["arn"], arn, "{path}");
        assert_eq!(
            a.header("x-amz-executed-version"),
            Some("$LATEST"),
            "{path}"
        );
    }

    // A version or alias that does not exist is Lambda's 404, and nothing runs.
    for path in [
        "echo/invocations?Qualifier=prod",
        "echo%3Aprod/invocations",
        "arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000%3Afunction%3Aecho%3A1/invocations",
    ] {
        let a = post(path.to_string()).await;
        assert_eq!(a.status, 404, "{path}");
        assert_eq!(
            a.header("x-amzn-errortype"),
            Some("ResourceNotFoundException")
        );
        assert_eq!(a.header("x-amz-executed-version"), None, "{path}");
        let message = a.json()["Message"].as_str().unwrap().to_string();
        assert!(
            message.starts_with(&format!("Function not found: {arn}:")),
            "{message}"
        );
    }
    assert_eq!(
        post("echo/invocations?Qualifier=prod".into()).await.json(),
        json!({"Type": "User", "Message": format!("Function not found: {arn}:prod")})
    );

    let a = post("echo%3Av1/invocations?Qualifier=v2".into()).await;
    assert_eq!(
        (a.status, a.header("x-amzn-errortype")),
        (400, Some("InvalidParameterValueException"))
    );
    assert_eq!(
        a.json()["message"],
        "The derived qualifier from the function name does not match the specified qualifier."
    );
    let a =
        post("arn%3Aaws%3Alambda%3Aeu-west-1%3A000000000000%3Afunction%3Aecho/invocations".into())
            .await;
    assert_eq!(a.status, 404);
    assert_eq!(
        a.json()["Message"],
        "Functions from 'eu-west-1' are not reachable in this region ('us-east-1')"
    );
    for (path, wants) in [
        (
            "arn%3Aaws%3Alambda%3Aeast%3A000000000000%3Afunction%3Aecho",
            "Member must satisfy regular expression pattern: (arn:(aws[a-zA-Z-]*)?:lambda:)?",
        ),
        (
            "my%20function",
            "at 'functionName' failed to satisfy constraint",
        ),
        (
            &"e".repeat(171),
            "Member must have length less than or equal to 170",
        ),
        (
            "echo?Qualifier=%2A",
            "at 'qualifier' failed to satisfy constraint",
        ),
    ] {
        let (name, query) = path.split_once('?').unwrap_or((path, ""));
        let a = post(format!("{name}/invocations?{query}")).await;
        assert_eq!(
            (a.status, a.header("x-amzn-errortype")),
            (400, Some("ValidationException")),
            "{path}"
        );
        let message = a.json()["message"].as_str().unwrap().to_string();
        assert!(
            message.starts_with("1 validation error detected: Value '"),
            "{message}"
        );
        assert!(message.contains(wants), "{path}: {message}");
    }
    // Only the seven served names ran.
    let mut c = Client::connect(h.addr).await.unwrap();
    let metrics = c.get("/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("kindling_invocations_total{function=\"echo\"} 7\n"),
        "{text}"
    );
    drop(c);
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_invocations_on_four_environments() {
    let make = |code: &std::path::Path| {
        let mut f = function("par", code);
        f.max_concurrency = 4;
        vec![f]
    };
    let Some(h) = start(make, |o| o.queue_depth = 200).await else {
        return;
    };
    let mut calls = Vec::new();
    for n in 0..100 {
        let addr = h.addr;
        calls.push(tokio::spawn(async move {
            let payload = json!({"n": n, "action": "sleep", "seconds": 0.01});
            (
                n,
                client::invoke(addr, "par", payload.to_string(), &InvokeOptions::default())
                    .await
                    .unwrap(),
            )
        }));
    }
    let mut pids = HashSet::new();
    let mut ids = HashSet::new();
    for call in calls {
        let (n, r) = call.await.unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let b = body(&r);
        assert_eq!(b["echo"]["n"], n, "a response reached the wrong caller");
        pids.insert(b["pid"].as_i64().unwrap());
        assert!(ids.insert(b["requestId"].as_str().unwrap().to_string()));
    }
    assert_eq!(
        pids.len(),
        4,
        "work spread over exactly max_concurrency environments"
    );
    assert_eq!(h.started(), 4);
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_stops_every_idle_environment_at_once() {
    // Two functions, two environments each: a guest's shutdown takes a while, and a
    // server with many would otherwise take that many times as long to stop.
    let make = |code: &std::path::Path| {
        ["one", "two"]
            .map(|name| {
                let mut f = function(name, code);
                f.max_concurrency = 2;
                f
            })
            .to_vec()
    };
    let Some(h) = start(make, |_| {}).await else {
        return;
    };
    let sleep = || json!({"action": "sleep", "seconds": 0.3});
    tokio::join!(
        h.invoke("one", sleep()),
        h.invoke("one", sleep()),
        h.invoke("two", sleep()),
        h.invoke("two", sleep()),
    );
    assert_eq!(h.started(), 4);
    let census = h.census.clone();
    h.close().await;
    assert_eq!(census.most_stopping.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429() {
    let make = |code: &std::path::Path| {
        let mut f = function("one", code);
        f.max_concurrency = 1;
        vec![f]
    };
    let Some(h) = start(make, |o| o.queue_depth = 1).await else {
        return;
    };
    // Warm it up so that the busy window below is the sleep only.
    assert_eq!(h.invoke("one", json!({})).await.status, 200);
    let slow = |addr| {
        tokio::spawn(async move {
            client::invoke(
                addr,
                "one",
                json!({"action": "sleep", "seconds": 0.8}).to_string(),
                &InvokeOptions::default(),
            )
            .await
            .unwrap()
        })
    };
    let running = slow(h.addr);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let queued = slow(h.addr);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = h.invoke("one", json!({})).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["x-amzn-errortype"], "TooManyRequestsException");
    assert_eq!(running.await.unwrap().status, 200);
    assert_eq!(
        queued.await.unwrap().status,
        200,
        "the queued invocation ran"
    );
    assert_eq!(h.started(), 1);
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_invocations_are_bounded_and_refused_with_429_never_dropped() {
    let make = |code: &std::path::Path| {
        ["few", "big"]
            .map(|name| {
                let mut f = function(name, code);
                f.max_concurrency = 1;
                f
            })
            .to_vec()
    };
    let Some(mut h) = start(make, |o| {
        o.event_queue_depth = 3;
        o.event_queue_bytes = 64 << 10;
    })
    .await
    else {
        return;
    };
    let event = InvokeOptions {
        invocation_type: InvocationType::Event,
        ..Default::default()
    };
    let mut c = Client::connect(h.addr).await.unwrap();
    let sleepy = |n: usize, pad: usize| {
        json!({"n": n, "action": "sleep", "seconds": 0.5, "pad": "p".repeat(pad)}).to_string()
    };
    let throttled = |r: &InvokeResponse, what: &str| {
        assert_eq!(r.status, 429, "{what}");
        assert_eq!(r.headers["x-amzn-errortype"], "TooManyRequestsException");
        let b = body(r);
        assert_eq!(b["Type"], "User");
        assert_eq!(b["Reason"], "FunctionInvocationRateLimitExceeded");
        let message = b["message"].as_str().unwrap().to_string();
        assert!(message.starts_with("Rate Exceeded"), "{message}");
        message
    };

    // By count: three slow events are accepted (one runs, two wait), the fourth is not.
    for n in 0..3 {
        let r = c.invoke("few", sleepy(n, 0), &event).await.unwrap();
        assert_eq!(r.status, 202, "event {n}");
    }
    let r = c.invoke("few", sleepy(3, 0), &event).await.unwrap();
    let message = throttled(&r, "the fourth event");
    assert!(message.contains("3 Event invocations"), "{message}");

    // By bytes (64 KiB here): a second 40 KB event does not fit beside the first.
    let r = c.invoke("big", sleepy(10, 40_000), &event).await.unwrap();
    assert_eq!(r.status, 202);
    let r = c.invoke("big", sleepy(11, 40_000), &event).await.unwrap();
    let message = throttled(&r, "40 KB past the bytes bound");
    assert!(message.contains("65536 bytes"), "{message}");
    // Synchronous calls are not bounded by the events: one still runs (after them).
    let plain = InvokeOptions::default();
    let r = c.invoke("few", json!({"n": 20}).to_string(), &plain);
    let r = tokio::time::timeout(Duration::from_secs(20), r)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);

    // Past Lambda's asynchronous payload limit (1 MiB): 413, before any queue.
    let max = kindling_runtime_api::MAX_EVENT_PAYLOAD_BYTES;
    let r = c.invoke("big", vec![b' '; max + 1], &event).await.unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(
        r.headers["x-amzn-errortype"],
        "RequestEntityTooLargeException"
    );
    assert_eq!(
        body(&r)["message"],
        format!(
            "{} byte payload is too large for the Event invocation type (limit {max} bytes)",
            max + 1
        )
    );
    // Exactly the limit is not too large (here it only overflows the 64 KiB queue): a
    // JSON string of `max` bytes, quotes included.
    let mut exactly = vec![b'a'; max];
    exactly[0] = b'"';
    exactly[max - 1] = b'"';
    let r = c.invoke("big", exactly, &event).await.unwrap();
    assert_eq!(r.status, 429);

    // Every accepted event runs; once they are over, there is room again.
    let mut want: HashSet<String> = [0, 1, 2, 10].map(|n| format!("handling {n} sleep")).into();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !want.is_empty() {
            let line = h.logs.recv().await.unwrap();
            want.remove(&line.text);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("accepted events that never ran: {want:?}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = c.invoke("big", sleepy(12, 40_000), &event).await.unwrap();
        if r.status == 202 {
            break;
        }
        throttled(&r, "while the first big event runs");
        assert!(std::time::Instant::now() < deadline, "no room again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.log_line("handling 12 sleep").await;
    drop(c);
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_older_than_its_maximum_age_goes_to_the_on_failure_destination() {
    // The age is 1 s here (Lambda's floor of 60 s is the API's and functions.toml's
    // check, not the queue's): the failed first attempt's retry falls due 2 s later, past
    // it, so the event is dropped instead of retried, and its record says why.
    let Some(h) = start(
        |code| vec![function("aging", code)],
        |o| {
            o.event_retry_base = Duration::from_secs(2);
            o.event_invoke.insert(
                "aging".into(),
                kindling_runtime_api::store::EventInvokeConfig {
                    maximum_event_age_s: 1,
                    on_failure: Some("arn:aws:sqs:us-east-1:000000000000:aged".into()),
                    ..Default::default()
                },
            );
        },
    )
    .await
    else {
        return;
    };
    let event = InvokeOptions {
        invocation_type: InvocationType::Event,
        ..Default::default()
    };
    let mut c = Client::connect(h.addr).await.unwrap();
    let r = c
        .invoke("aging", json!({"action": "error"}).to_string(), &event)
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    let request_id = r.headers["x-amzn-requestid"].clone();
    let file = h.state.path().join("destinations/aged.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let record: Value = loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Some(line) = text.lines().next() {
                break serde_json::from_str(line).unwrap();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no record in {file:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let context = &record["requestContext"];
    assert_eq!(context["requestId"], request_id.to_str().unwrap());
    assert_eq!(context["condition"], "EventAgeExceeded");
    assert_eq!(context["approximateInvokeCount"], 1, "{record}");
    assert_eq!(record["requestPayload"], json!({"action": "error"}));
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("kindling_events_dropped_total{function=\"aging\"} 1\n"),
        "{metrics}"
    );
    drop(c);
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_no_environment_could_run_is_tried_again_without_counting_an_attempt() {
    // More refused starts than the function's attempts: had they counted, the event would
    // have ended RetriesExhausted with a ServiceException.
    let Some(h) = start(
        |code| vec![function("unlucky", code)],
        |o| {
            o.event_retry_base = Duration::from_millis(100);
            o.event_invoke.insert(
                "unlucky".into(),
                kindling_runtime_api::store::EventInvokeConfig {
                    on_success: Some("arn:aws:sqs:us-east-1:000000000000:ran".into()),
                    on_failure: Some("arn:aws:sqs:us-east-1:000000000000:lost".into()),
                    ..Default::default()
                },
            );
        },
    )
    .await
    else {
        return;
    };
    h.census.refuse_starts.store(5, Ordering::SeqCst);
    let event = InvokeOptions {
        invocation_type: InvocationType::Event,
        ..Default::default()
    };
    let mut c = Client::connect(h.addr).await.unwrap();
    let r = c
        .invoke("unlucky", json!({"n": 1}).to_string(), &event)
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    let request_id = r.headers["x-amzn-requestid"].clone();
    let file = h.state.path().join("destinations/ran.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let record: Value = loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Some(line) = text.lines().next() {
                break serde_json::from_str(line).unwrap();
            }
        }
        assert!(
            !h.state.path().join("destinations/lost.jsonl").exists(),
            "the event failed instead of waiting for an environment"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no record in {file:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(h.census.refuse_starts.load(Ordering::SeqCst), 0);
    let context = &record["requestContext"];
    assert_eq!(context["requestId"], request_id.to_str().unwrap());
    assert_eq!(context["condition"], "Success", "{record}");
    assert_eq!(context["approximateInvokeCount"], 1, "{record}");
    drop(c);
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_invocation_reports_the_memory_its_guest_last_measured() {
    let make = |code: &std::path::Path| {
        let mut f = function("hungry", code);
        f.timeout = Duration::from_secs(1);
        vec![f]
    };
    let Some(mut h) = start(make, |_| {}).await else {
        return;
    };
    let r = h
        .invoke(
            "hungry",
            json!({"action": "memory", "mb": 77, "seconds": 5}),
        )
        .await;
    assert_eq!(body(&r)["errorType"], "Sandbox.Timedout", "{}", body(&r));
    let report = h.log_line("REPORT RequestId").await;
    assert!(
        report.contains("\tMax Memory Used: 77 MB\t") && report.ends_with("\tStatus: timeout"),
        "{report}"
    );
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_kills_the_environment_and_the_next_gets_a_fresh_one() {
    let make = |code: &std::path::Path| {
        let mut f = function("slow", code);
        f.timeout = Duration::from_secs(1);
        vec![f]
    };
    let Some(mut h) = start(make, |_| {}).await else {
        return;
    };
    let first = body(&h.invoke("slow", json!({})).await)["pid"]
        .as_i64()
        .unwrap();
    let started = std::time::Instant::now();
    let r = h
        .invoke("slow", json!({"action": "sleep", "seconds": 5}))
        .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        (r.status.as_u16(), r.function_error.as_deref()),
        (200, Some("Unhandled"))
    );
    let b = body(&r);
    assert_eq!(b["errorType"], "Sandbox.Timedout");
    assert!(
        b["errorMessage"]
            .as_str()
            .unwrap()
            .ends_with("Task timed out after 1.00 seconds"),
        "{b}"
    );
    h.log_line("Task timed out after 1.00 seconds").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !alive(u32::try_from(first).unwrap()),
        "the timed-out environment still runs"
    );
    let r = h.invoke("slow", json!({})).await;
    assert_eq!(r.status, 200);
    assert_ne!(body(&r)["pid"].as_i64().unwrap(), first);
    let text = h.metrics().await;
    assert!(
        text.contains("kindling_timeouts_total{function=\"slow\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("kindling_cold_starts_total{function=\"slow\"} 2"),
        "{text}"
    );
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_fail_the_invocation_in_flight_then_recover() {
    let Some(h) = start(|code| vec![function("crashy", code)], |_| {}).await else {
        return;
    };
    // The environment itself dies (Environment::exited).
    let r = h.invoke("crashy", json!({"action": "exit"})).await;
    assert_eq!(r.function_error.as_deref(), Some("Unhandled"));
    let b = body(&r);
    assert_eq!(b["errorType"], "Runtime.ExitError");
    assert!(
        b["errorMessage"]
            .as_str()
            .unwrap()
            .ends_with("Runtime exited with error: exit status 3"),
        "{b}"
    );
    let r = h.invoke("crashy", json!({"n": 1})).await;
    assert_eq!((r.status.as_u16(), r.function_error), (200, None));
    // The guest reports its runtime's death (/kindling/v1/runtime/exit).
    let r = h.invoke("crashy", json!({"action": "runtime_exit"})).await;
    let b = body(&r);
    assert_eq!(b["errorType"], "Runtime.ExitError");
    assert!(
        b["errorMessage"]
            .as_str()
            .unwrap()
            .ends_with("Runtime exited with error: exit status 7"),
        "{b}"
    );
    let r = h.invoke("crashy", json!({"n": 2})).await;
    assert_eq!(
        (r.status.as_u16(), body(&r)["echo"]["n"].as_i64()),
        (200, Some(2))
    );
    assert_eq!(h.started(), 3);
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_error_fails_the_invocation_at_once() {
    let make = |code: &std::path::Path| {
        let mut f = function("loud", code);
        f.timeout = Duration::from_secs(10);
        f.max_concurrency = 1;
        vec![f]
    };
    let Some(h) = start(make, |_| {}).await else {
        return;
    };
    let pid = body(&h.invoke("loud", json!({})).await)["pid"].clone();
    let started = std::time::Instant::now();
    let r = h
        .invoke(
            "loud",
            json!({"action": "big_error", "bytes": kindling_wire::MAX_RESPONSE_BYTES + 1}),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(
        (r.status.as_u16(), r.function_error.as_deref()),
        (200, Some("Unhandled"))
    );
    let b = body(&r);
    assert_eq!(b["errorType"], "Function.ResponseSizeTooLarge", "{b}");
    // Not the function's 10 s timeout: as soon as the runtime posted it.
    assert!(took < Duration::from_secs(6), "{took:?}");
    // The environment is fine and serves the next invocation.
    let r = h.invoke("loud", json!({})).await;
    assert_eq!(body(&r)["pid"], pid);
    assert_eq!(h.started(), 1);
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_logs_keeps_a_tail_in_memory_and_a_capped_file_on_disk() {
    const CAP: u64 = 1 << 20;
    let Some(h) = start(
        |code| vec![function("spam", code)],
        |o| o.log_file_max_bytes = CAP,
    )
    .await
    else {
        return;
    };
    // 4 MB of numbered 1000-byte lines: four times the file's cap.
    let lines = 4000;
    let tail = InvokeOptions {
        log_tail: true,
        ..Default::default()
    };
    let payload = json!({"action": "spam", "lines": lines, "width": 1000});
    let r = client::invoke(h.addr, "spam", payload.to_string(), &tail)
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.function_error.as_deref()),
        (200, None)
    );
    let id = body(&r)["requestId"].as_str().unwrap().to_string();
    let log_tail = r.log_tail.unwrap();
    assert!(log_tail.len() <= kindling_runtime_api::logs::TAIL_BYTES);
    let tail_lines: Vec<&str> = log_tail.lines().collect();
    let n = tail_lines.len();
    assert!(tail_lines[n - 3].starts_with("line 3999 xxx"), "{log_tail}");
    assert_eq!(tail_lines[n - 2], format!("END RequestId: {id}"));
    assert!(tail_lines[n - 1].starts_with(&format!("REPORT RequestId: {id}\t")));
    assert!(tail_lines[0].starts_with("line 39"), "{log_tail}");

    // On disk: the current file and one rotated file, each within the cap, holding the
    // most recent lines in order.
    let dir = h.state.path().join("logs");
    let current = std::fs::read_to_string(dir.join("spam.log")).unwrap();
    let previous = std::fs::read_to_string(dir.join("spam.log.1")).unwrap();
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    for text in [&current, &previous] {
        assert!(u64::try_from(text.len()).unwrap() <= CAP, "{}", text.len());
    }
    let both = format!("{previous}{current}");
    assert!(both.len() > (1 << 20), "{}", both.len());
    let numbers: Vec<usize> = both
        .lines()
        .filter_map(|l| l.strip_prefix("line ")?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(*numbers.last().unwrap(), lines - 1);
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "lines lost between the files"
    );
    assert!(current.ends_with(&format!("{}\n", tail_lines[n - 1])));
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_errors_go_to_the_invocation_that_started_the_environment() {
    let make = |code: &std::path::Path| {
        let mut f = function("broken", code);
        f.env
            .insert("INIT_ERROR".into(), "cannot import app".into());
        vec![f]
    };
    let Some(h) = start(make, |_| {}).await else {
        return;
    };
    for _ in 0..2 {
        let r = h.invoke("broken", json!({})).await;
        assert_eq!(
            (r.status.as_u16(), r.function_error.as_deref()),
            (200, Some("Unhandled"))
        );
        let b = body(&r);
        assert_eq!(
            (b["errorType"].as_str(), b["errorMessage"].as_str()),
            (Some("Runtime.BadInit"), Some("cannot import app"))
        );
    }
    assert_eq!(h.started(), 2, "a failed init is not reused");
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_environments_retire() {
    let Some(h) = start(
        |code| vec![function("idle", code)],
        |o| o.idle_timeout = Duration::from_millis(300),
    )
    .await
    else {
        return;
    };
    let first = body(&h.invoke("idle", json!({})).await)["pid"].clone();
    assert_eq!(h.census.running.load(Ordering::SeqCst), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while h.census.running.load(Ordering::SeqCst) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle environment was not retired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = body(&h.invoke("idle", json!({})).await)["pid"].clone();
    assert_ne!(first, second);
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_hangs_up_loses_its_answer_but_not_the_environment() {
    // One environment at most: the next invocation must get that very one back.
    let make = |code: &std::path::Path| {
        let mut f = function("hangup", code);
        f.max_concurrency = 1;
        vec![f]
    };
    let Some(mut h) = start(make, |_| {}).await else {
        return;
    };
    let first = body(&h.invoke("hangup", json!({})).await)["pid"].clone();
    let mut raw = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let payload = json!({"n": 5, "action": "sleep", "seconds": 0.3}).to_string();
    let head = format!(
        "POST /2015-03-31/functions/hangup/invocations HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut raw, head.as_bytes())
        .await
        .unwrap();
    h.log_line("handling 5 sleep").await;
    drop(raw);
    let r = tokio::time::timeout(Duration::from_secs(5), h.invoke("hangup", json!({})))
        .await
        .expect("the environment was lost with its caller");
    assert_eq!(
        body(&r)["pid"],
        first,
        "the environment went back to the warm pool"
    );
    assert_eq!(h.started(), 1);
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_what_outlives_the_grace_and_leaves_nothing() {
    let Some(h) = start(
        |code| vec![function("long", code)],
        |o| o.shutdown_grace = Duration::from_millis(300),
    )
    .await
    else {
        return;
    };
    let addr = h.addr;
    let call = tokio::spawn(async move {
        client::invoke(
            addr,
            "long",
            json!({"action": "sleep", "seconds": 2.5}).to_string(),
            &InvokeOptions::default(),
        )
        .await
        .unwrap()
    });
    while h.started() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = std::time::Instant::now();
    let census = h.census.clone();
    h.close().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "shutdown waited for the invocation"
    );
    let r = call.await.unwrap();
    assert_eq!(r.function_error.as_deref(), Some("Unhandled"));
    assert!(
        body(&r)["errorMessage"]
            .as_str()
            .unwrap()
            .contains("shut down"),
        "{}",
        body(&r)
    );
    assert_eq!(census.running.load(Ordering::SeqCst), 0);
}

/// Resolves when the server closes `read` (end of file or reset), with when.
async fn closed_at(mut read: impl tokio::io::AsyncRead + Unpin) -> std::time::Instant {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::io::AsyncReadExt::read(&mut read, &mut buf).await {
            Ok(0) | Err(_) => return std::time::Instant::now(),
            Ok(_) => {}
        }
    }
}

const DRY_RUN: &[(&str, &str)] = &[("X-Amz-Invocation-Type", "DryRun")];

/// Writes `head`, then `body` a byte every 50 ms (stopping quietly once the server closes),
/// then holds the connection open until aborted (hyper closes on a half-closed one).
fn trickle(
    mut write: tokio::net::tcp::OwnedWriteHalf,
    head: String,
    body: impl Iterator<Item = u8> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        if write.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for byte in body {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if write.write_all(&[byte]).await.is_err() {
                return;
            }
        }
        std::future::pending::<()>().await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_in_past_its_timeout_gets_408_and_loses_its_connection() {
    let body_timeout = Duration::from_secs(2);
    let Some(h) = start(
        |code| vec![function("trickle", code)],
        |o| o.body_read_timeout = body_timeout,
    )
    .await
    else {
        return;
    };
    let head = |len: usize| {
        format!(
            "POST /2015-03-31/functions/trickle/invocations HTTP/1.1\r\nHost: x\r\n\
             X-Amz-Invocation-Type: DryRun\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    let answer = |mut read: tokio::net::tcp::OwnedReadHalf| async move {
        let mut text = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::io::AsyncReadExt::read_to_end(&mut read, &mut text),
        )
        .await;
        String::from_utf8_lossy(&text).into_owned()
    };

    // Slow but whole within the limit: served.
    let (read, write) = tokio::net::TcpStream::connect(h.addr)
        .await
        .unwrap()
        .into_split();
    let sender = trickle(write, head(2), b"{}".iter().copied());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut tokio::io::BufReader::new(read), &mut line)
        .await
        .unwrap();
    assert!(line.starts_with("HTTP/1.1 204"), "{line:?}");
    sender.abort();

    // A body that never completes: 408 once its time is up, then the connection closes,
    // though bytes keep coming.
    let (read, write) = tokio::net::TcpStream::connect(h.addr)
        .await
        .unwrap()
        .into_split();
    let started = std::time::Instant::now();
    let sender = trickle(write, head(1000), std::iter::repeat(b' '));
    let text = answer(read).await;
    let took = started.elapsed();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("RequestTimeoutException"), "{text}");
    assert!(
        took >= body_timeout && took < Duration::from_secs(20),
        "answered after {took:?}"
    );
    sender.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_and_idle_connections_are_closed() {
    let header = Duration::from_millis(500);
    let idle = Duration::from_millis(1500);
    let Some(h) = start(
        |code| vec![function("conn", code)],
        |o| {
            o.header_read_timeout = header;
            o.keep_alive_timeout = idle;
        },
    )
    .await
    else {
        return;
    };
    let path = "/2015-03-31/functions/conn/invocations";

    // A connection that never sends a byte is closed once idle too long.
    let silent = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let silent_since = std::time::Instant::now();
    let silent = tokio::spawn(closed_at(silent));

    // Slowloris: a byte of a head every 50 ms, never ending it. Bytes keep coming, but
    // the head is not complete within the header timeout of its first byte.
    let (read, mut write) = tokio::net::TcpStream::connect(h.addr)
        .await
        .unwrap()
        .into_split();
    let first_byte = std::time::Instant::now();
    let trickle = tokio::spawn(async move {
        let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nX-Slow: ");
        for byte in head.bytes().chain(std::iter::repeat(b'z')) {
            if tokio::io::AsyncWriteExt::write_all(&mut write, &[byte])
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let closed = tokio::time::timeout(Duration::from_secs(10), closed_at(read))
        .await
        .expect("the slowloris connection was never closed");
    let took = closed - first_byte;
    assert!(took >= header && took < idle, "closed after {took:?}");
    trickle.abort();

    // Keep-alive: resting between requests is not a slow head; only the idle timeout
    // closes such a connection, counted from its last answer.
    let mut kept = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    assert_eq!(
        common::request(&mut kept, "POST", path, DRY_RUN, b"{}")
            .await
            .status,
        204
    );
    tokio::time::sleep(header + Duration::from_millis(300)).await;
    let a = common::request(&mut kept, "POST", path, DRY_RUN, b"{}").await;
    assert_eq!(
        a.status, 204,
        "closed while resting, before its idle timeout"
    );
    let answered = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), closed_at(&mut kept))
        .await
        .expect("the idle connection was never closed");
    let took = closed - answered;
    assert!(
        took >= idle - Duration::from_millis(50) && took < idle * 3,
        "closed {took:?} after its last answer"
    );

    let closed = tokio::time::timeout(Duration::from_secs(10), silent)
        .await
        .expect("the silent connection was never closed")
        .unwrap();
    let took = closed - silent_since;
    assert!(took >= idle - Duration::from_millis(50), "{took:?}");

    // The server itself is fine.
    assert_eq!(h.invoke("conn", json!({})).await.status, 200);

    // A kept-alive `Client` whose connection the server closed while it idled reconnects
    // for its next request (the nested bench's clients idle while other environments boot).
    let mut kept = Client::connect(h.addr).await.unwrap();
    let dry_run = InvokeOptions {
        invocation_type: InvocationType::DryRun,
        ..Default::default()
    };
    assert_eq!(
        kept.invoke("conn", "{}", &dry_run).await.unwrap().status,
        204
    );
    tokio::time::sleep(idle + Duration::from_millis(500)).await;
    let again = kept.invoke("conn", "{}", &dry_run).await;
    assert_eq!(
        again.expect("no reconnect after the idle close").status,
        204
    );
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_get_503_while_the_others_are_served() {
    let Some(h) = start(
        |code| vec![function("capped", code)],
        |o| o.max_connections = 4,
    )
    .await
    else {
        return;
    };
    let path = "/2015-03-31/functions/capped/invocations";
    // A client with a kept-alive connection, and three idle ones: four, the cap.
    let mut c = Client::connect(h.addr).await.unwrap();
    let plain = InvokeOptions::default();
    assert_eq!(c.invoke("capped", "{}", &plain).await.unwrap().status, 200);
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(h.addr).await.unwrap());
    }
    for i in 0..10 {
        let mut extra = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let a = common::request(&mut extra, "POST", path, &[], b"{}").await;
        assert_eq!(a.status, 503, "extra connection {i}");
        assert_eq!(a.header("x-amzn-errortype"), Some("ServiceException"));
        assert_eq!(a.header("connection"), Some("close"));
        let message = a.json()["message"].as_str().unwrap().to_string();
        assert!(message.contains("4 connections open"), "{message}");
        tokio::time::timeout(Duration::from_secs(5), closed_at(extra))
            .await
            .expect("a refused connection stayed open");
        // Meanwhile the connections within the cap are served as ever.
        let r = c.invoke("capped", json!({"n": i}).to_string(), &plain);
        assert_eq!(r.await.unwrap().status, 200);
    }
    assert_eq!(
        common::request(&mut idle[0], "POST", path, DRY_RUN, b"{}")
            .await
            .status,
        204
    );
    // Once some close, new connections are served again.
    drop(idle);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        // A raw request: a refused connection is answered before its request is read,
        // which an HTTP client library may report as a closed connection instead.
        let mut fresh = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let r = common::request(&mut fresh, "POST", path, &[], b"{}").await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503);
        assert!(std::time::Instant::now() < deadline, "no room again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(c);
    h.close().await;
}

/// Callers' request bodies count against one memory budget over every connection: while
/// one caller's 6 MB payload is half sent, another's that would pass the budget is answered
/// 429 `TooManyRequestsException` and its connection closed; the first completes, and once
/// its answer is out the budget is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_memory_budget_get_429_and_the_rest_are_served() {
    let Some(h) = start(
        |code| vec![function("echo", code)],
        |o| o.max_body_memory = 8 << 20,
    )
    .await
    else {
        return;
    };
    use tokio::io::AsyncWriteExt;
    let path = "/2015-03-31/functions/echo/invocations";
    // A JSON object of 6,000,000 bytes, and the head that announces it.
    let pad = 6_000_000 - r#"{"pad":""}"#.len();
    let payload = json!({"pad": "a".repeat(pad)}).to_string().into_bytes();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        payload.len()
    );
    let half = 3_000_000;
    let mut first = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    first.write_all(head.as_bytes()).await.unwrap();
    first.write_all(&payload[..half]).await.unwrap();
    // Until the server has read (and holds) the first half, the second would still fit.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut second = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    second.write_all(head.as_bytes()).await.unwrap();
    // The server stops reading once it answers: the rest may not be taken.
    let _ = tokio::time::timeout(Duration::from_secs(5), second.write_all(&payload)).await;
    let refused = tokio::time::timeout(Duration::from_secs(10), common::read_answer(&mut second))
        .await
        .expect("an answer to the body past the budget")
        .expect("an answer, not a closed connection");
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.header("x-amzn-errortype"),
        Some("TooManyRequestsException")
    );
    assert_eq!(refused.header("connection"), Some("close"));

    first.write_all(&payload[half..]).await.unwrap();
    let served = common::read_answer(&mut first)
        .await
        .expect("the first caller's answer");
    assert_eq!(served.status, 200);
    let echoed = served.json()["echo"]["pad"].as_str().map(str::len);
    assert_eq!(echoed, Some(pad));

    // Its payload released, a caller's 6 MB fits again.
    let mut c = Client::connect(h.addr).await.unwrap();
    let again = c
        .invoke("echo", payload.clone(), &InvokeOptions::default())
        .await
        .unwrap();
    assert_eq!(again.status, 200);
    h.close().await;
}

/// A launcher that cannot start anything.
struct BrokenLauncher;

#[async_trait::async_trait]
impl Launcher for BrokenLauncher {
    fn name(&self) -> &str {
        "broken"
    }
    async fn start(
        &self,
        _spec: &kindling_runtime_api::EnvironmentSpec,
    ) -> anyhow::Result<Box<dyn kindling_runtime_api::Environment>> {
        anyhow::bail!("no hypervisor here")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launcher_failure_is_a_clear_service_error() {
    let code = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let launchers = HashMap::from([(
        Isolation::Sandbox,
        Arc::new(BrokenLauncher) as Arc<dyn Launcher>,
    )]);
    let mut options = ServerOptions::new(state.path());
    options.invoke_addr = "127.0.0.1:0".parse().unwrap();
    // A function whose isolation has no launcher is refused up front.
    let mut vm = function("vm", code.path());
    vm.isolation = Isolation::MicroVm;
    let err = Server::bind(vec![vm], launchers.clone(), options.clone())
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("no launcher for isolation MicroVm"),
        "{err}"
    );

    let server = Server::bind(vec![function("f", code.path())], launchers, options)
        .await
        .unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let r = client::invoke(addr, "f", "{}", &InvokeOptions::default())
        .await
        .unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(r.headers["x-amzn-errortype"], "ServiceException");
    assert!(
        body(&r)["message"]
            .as_str()
            .unwrap()
            .contains("no hypervisor here"),
        "{}",
        body(&r)
    );
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert!(!state.path().join("envs").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_environments_freeze_and_thaw_for_their_next_invocation() {
    // A 1 s timeout, shorter than the time the environment then spends frozen.
    let make = |code: &std::path::Path| {
        let mut f = function("frozen", code);
        f.timeout = Duration::from_secs(1);
        f.max_concurrency = 1;
        vec![f]
    };
    // A delay far above a fake-guest invocation's few milliseconds, so that back-to-back
    // invocations never idle that long however slow the machine.
    let Some(h) = start(make, |o| o.freeze_after = Some(Duration::from_secs(2))).await else {
        return;
    };
    let pid = body(&h.invoke("frozen", json!({})).await)["pid"].clone();
    // Back to back, each invocation comes before the environment has idled long enough.
    for _ in 0..5 {
        h.invoke("frozen", json!({})).await;
    }
    assert_eq!(h.census.freezes.load(Ordering::SeqCst), 0);
    let stat = || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while h.census.freezes.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "never frozen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGSTOP takes effect once the guest is next scheduled: on a loaded host, a moment later.
    while !stat().contains(") T ") {
        assert!(
            std::time::Instant::now() < deadline,
            "not stopped: {}",
            stat()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Thawed first; its timeout counts from then, not from when it was frozen.
    let r = h
        .invoke("frozen", json!({"action": "sleep", "seconds": 0.5}))
        .await;
    assert_eq!(
        (r.status.as_u16(), r.function_error.as_deref()),
        (200, None)
    );
    assert_eq!(body(&r)["pid"], pid, "the frozen environment served it");
    assert_eq!(h.census.thaws.load(Ordering::SeqCst), 1);
    let text = h.metrics().await;
    for line in [
        "kindling_freezes_total{function=\"frozen\"} 1",
        "kindling_thaw_seconds_count{function=\"frozen\"} 1",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    // Frozen again, then stopped by the shutdown: thawed first.
    while h.census.freezes.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let census = h.census.clone();
    h.close().await;
    assert_eq!(census.stopped_frozen.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_idle_environments_still_retire() {
    let Some(h) = start(
        |code| vec![function("retired", code)],
        |o| {
            o.freeze_after = Some(Duration::ZERO);
            o.idle_timeout = Duration::from_millis(600);
        },
    )
    .await
    else {
        return;
    };
    h.invoke("retired", json!({})).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while h.census.running.load(Ordering::SeqCst) > 0 {
        assert!(std::time::Instant::now() < deadline, "never retired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.census.freezes.load(Ordering::SeqCst), 1);
    assert_eq!(h.census.thaws.load(Ordering::SeqCst), 1, "thawed to stop");
    assert_eq!(h.census.stopped_frozen.load(Ordering::SeqCst), 0);
    h.close().await;
}
