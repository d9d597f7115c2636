//! Response streaming and function URLs (issue 13) through unmodified clients: boto3's
//! `invoke_with_response_stream` (`tests/streaming/invoke_stream.py`, which stamps each
//! event as it arrives), the JavaScript SDK's `InvokeWithResponseStreamCommand` (its twin
//! `invoke_stream.cjs`) and curl, against `kindling serve` with sandboxed functions: AWS's
//! `lambda_runtime` crate in streaming mode, a node `streamifyResponse` handler and plain
//! Python handlers.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::support::{prerequisites, repo_path, Binaries, FunctionDef, Scratch, Server};

/// A Python whose boto3 has `invoke_with_response_stream` (botocore 1.29.1xx and later:
/// PATH's, Debian's, or the virtual environment scripts/setup.sh makes when Debian's is
/// older); otherwise prints why the test skips. Decided once per test process.
pub(crate) fn python_with_streaming_boto3() -> Option<StreamClient> {
    static FOUND: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
    let found = *FOUND.get_or_init(|| {
        [
            "python3",
            "/usr/bin/python3",
            "/opt/kindling-boto3/bin/python3",
        ]
        .into_iter()
        .find(|python| has_streaming_boto3(python))
    });
    if found.is_none() {
        println!(
            "SKIPPED: no boto3 with invoke_with_response_stream (scripts/setup.sh installs one)"
        );
    }
    found.map(|python| StreamClient {
        program: python.to_string(),
        script: "tests/streaming/invoke_stream.py",
    })
}

/// Whether `python` answers that its boto3 streams. Only a definite answer counts: a
/// python that is not there (or a shim's 127), or one whose import fails (exit 3), says
/// no; a spawn that fails or a python that dies otherwise says nothing of boto3 (another
/// test may hold thousands of connections open and the fds with them, or the machine be
/// loaded), so it is asked again for up to two minutes, and past that the test fails
/// with the error.
fn has_streaming_boto3(python: &str) -> bool {
    const CHECK: &str = "import sys
try:
    import boto3
    boto3.client('lambda', region_name='us-east-1').invoke_with_response_stream
except (ImportError, AttributeError):
    sys.exit(3)";
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let undecided = match Command::new(python).args(["-c", CHECK]).output() {
            Ok(o) if o.status.success() => return true,
            Ok(o) if matches!(o.status.code(), Some(3 | 127)) => return false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            Ok(o) => format!("{}: {}", o.status, String::from_utf8_lossy(&o.stderr)),
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "{python} could not be asked whether its boto3 streams: {undecided}"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Where scripts/setup.sh installs the AWS SDK for JavaScript v3's Lambda client.
const JS_SDK: &str = "/opt/kindling-js-sdk/node_modules/@aws-sdk/client-lambda";

/// Node.js with the JavaScript SDK (which needs Node 20 or later); otherwise prints why
/// the test skips.
fn node_with_js_sdk() -> Option<StreamClient> {
    let major = Command::new("node")
        .args(["-p", "process.versions.node.split('.')[0]"])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<u32>()
                .ok()
        });
    if major.is_none_or(|m| m < 20) || !std::path::Path::new(JS_SDK).is_dir() {
        println!("SKIPPED: no Node.js >= 20 with {JS_SDK} (scripts/setup.sh installs it)");
        return None;
    }
    Some(StreamClient {
        program: "node".into(),
        script: "tests/streaming/invoke_stream.cjs",
    })
}

/// An unmodified AWS client's streaming invoke: `program script ENDPOINT FUNCTION PAYLOAD
/// LOG_TYPE` prints one JSON line per event as it arrives.
pub(crate) struct StreamClient {
    program: String,
    script: &'static str,
}

/// One event of a streaming invocation, as boto3 handed it over.
#[derive(Debug)]
struct Event {
    /// Seconds since the call began.
    t: f64,
    kind: String,
    fields: Value,
}

impl Event {
    fn data(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(self.fields["data"].as_str().unwrap_or(""))
            .expect("base64 data")
    }
}

/// Invokes `function` with the client's streaming invoke and returns every event.
fn stream(client: &StreamClient, server: &Server, function: &str, payload: &Value) -> Vec<Event> {
    let script = client.script;
    let output = Command::new(&client.program)
        .arg(repo_path(script))
        .arg(format!("http://{}", server.addr))
        .arg(function)
        .arg(payload.to_string())
        .arg("Tail")
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{script} {function} failed:\n{stdout}{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.diagnostics()
    );
    stdout
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("a JSON line");
            Event {
                t: v["t"].as_f64().expect("t"),
                kind: v["event"].as_str().expect("event").to_string(),
                fields: v,
            }
        })
        .collect()
}

/// `function` streams `first`, then a second later `second`: the client gets each chunk as
/// it is written, REPORT covers the whole stream, and a failure in mid-stream reaches the
/// client as an error event after what was streamed.
pub(crate) fn chunks_arrive_as_written(client: &StreamClient, server: &Server, function: &str) {
    let events = stream(client, server, function, &json!({}));
    let (chunks, complete) = split(&events);
    assert_eq!(
        events[0].fields["content_type"], "application/vnd.amazon.eventstream",
        "{events:?}"
    );
    assert_eq!(events[0].fields["version"], "$LATEST");
    let body = joined(&chunks);
    assert!(
        body.ends_with(b"first\nsecond\n"),
        "{function}: {:?}",
        String::from_utf8_lossy(&body)
    );
    // Each chunk arrived as it was written: `first` a second before `second`.
    let gap = arrival(&chunks, "second") - arrival(&chunks, "first");
    assert!(
        gap >= 0.8,
        "{function}: chunks {gap:.3} s apart: {events:?}"
    );
    assert!(complete.fields.get("ErrorCode").is_none(), "{events:?}");
    // The REPORT covers the whole stream, not just its start.
    let ms = reported_ms(complete);
    assert!(ms >= 900.0, "{function}: REPORT Duration {ms} ms");

    // A failure in mid-stream: what was streamed arrives, then the error.
    let events = stream(
        client,
        server,
        function,
        &json!({"fail": true, "pauseMs": 300, "pause_ms": 300}),
    );
    let (chunks, complete) = split(&events);
    assert!(String::from_utf8_lossy(&joined(&chunks)).contains("first\n"));
    assert!(!String::from_utf8_lossy(&joined(&chunks)).contains("second"));
    let code = complete.fields["ErrorCode"].as_str().unwrap_or("");
    assert!(!code.is_empty(), "{function}: {events:?}");
    let details = complete.fields["ErrorDetails"].as_str().unwrap_or("");
    assert!(
        details.contains("deliberate failure in mid-stream"),
        "{function}: {events:?}"
    );
}

/// The JavaScript SDK's `InvokeWithResponseStreamCommand`, unmodified, reads the chunks of a
/// `lambda_runtime` streaming function and a node `streamifyResponse` handler as they come.
#[tokio::test]
async fn streamed_responses_reach_the_js_sdk_as_they_are_written() {
    let Some(bins) = prerequisites(&["/usr/bin/node"]) else {
        return;
    };
    let Some(node) = node_with_js_sdk() else {
        return;
    };
    let (_code, server) = streaming_server(bins);
    for function in ["rusty-stream", "node-stream"] {
        chunks_arrive_as_written(&node, &server, function);
    }
    server.stop();
}

/// The payload chunks' bytes, and the `InvokeComplete` event (which must come last).
fn split(events: &[Event]) -> (Vec<&Event>, &Event) {
    assert_eq!(events[0].kind, "head", "{events:?}");
    assert_eq!(events[0].fields["status"], 200, "{events:?}");
    let complete = events.last().expect("events");
    assert_eq!(complete.kind, "InvokeComplete", "{events:?}");
    let chunks: Vec<&Event> = events.iter().filter(|e| e.kind == "PayloadChunk").collect();
    assert_eq!(chunks.len() + 2, events.len(), "{events:?}");
    (chunks, complete)
}

fn joined(chunks: &[&Event]) -> Vec<u8> {
    chunks.iter().flat_map(|c| c.data()).collect()
}

/// The time the chunk holding `text` arrived.
fn arrival(chunks: &[&Event], text: &str) -> f64 {
    chunks
        .iter()
        .find(|c| String::from_utf8_lossy(&c.data()).contains(text))
        .unwrap_or_else(|| panic!("no chunk holds {text:?}: {chunks:?}"))
        .t
}

/// The `REPORT` line's duration in the base64 log tail of `InvokeComplete`.
fn reported_ms(complete: &Event) -> f64 {
    let log = base64::engine::general_purpose::STANDARD
        .decode(complete.fields["LogResult"].as_str().expect("LogResult"))
        .expect("base64 log");
    let log = String::from_utf8_lossy(&log);
    let duration = log
        .split("\tDuration: ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .unwrap_or_else(|| panic!("no REPORT duration in {log}"));
    duration.parse().expect("a duration")
}

/// A server with the streaming functions; the scratch folder holds the `lambda_runtime`
/// function's code and must live as long as the server.
fn streaming_server(bins: &'static Binaries) -> (Scratch, Server) {
    let code = Scratch::new();
    std::fs::copy(&bins.lambda_rs_bootstrap, code.path().join("bootstrap"))
        .expect("copying the lambda_runtime bootstrap");
    let server = Server::start(bins, &streaming_functions(code.path()));
    (code, server)
}

fn streaming_functions(lambda_rs: &std::path::Path) -> Vec<FunctionDef> {
    let mut rusty = FunctionDef::new("rusty-stream", lambda_rs, "provided", "unused.handler");
    rusty.env.push(("KINDLING_TEST_STREAM".into(), "1".into()));
    rusty.timeout = 20;
    let node = FunctionDef::new(
        "node-stream",
        repo_path("tests/functions/node-cases"),
        "node",
        "cases.streamsSlowly",
    );
    vec![rusty, node, FunctionDef::python_case("echo", "echo")]
}

#[tokio::test]
async fn streamed_responses_reach_boto3_as_they_are_written() {
    let Some(bins) = prerequisites(&["/usr/bin/node"]) else {
        return;
    };
    let Some(python) = python_with_streaming_boto3() else {
        return;
    };
    let (_code, server) = streaming_server(bins);

    for function in ["rusty-stream", "node-stream"] {
        chunks_arrive_as_written(&python, &server, function);
    }
    // The crate's error, written into the body for lack of trailers, names its type.
    let events = stream(
        &python,
        &server,
        "rusty-stream",
        &json!({"fail": true, "pause_ms": 10}),
    );
    assert_eq!(split(&events).1.fields["ErrorCode"], "Runtime.StreamError");

    // A buffered function answers a streaming invocation with its payload as chunks.
    let events = stream(&python, &server, "echo", &json!({"id": "buffered"}));
    let (chunks, complete) = split(&events);
    let answer: Value = serde_json::from_slice(&joined(&chunks)).expect("JSON payload");
    assert_eq!(answer["id"], "buffered");
    assert!(complete.fields.get("ErrorCode").is_none(), "{events:?}");

    // Past 20 MB the stream is cut and the invocation fails as Lambda's does.
    let events = stream(
        &python,
        &server,
        "rusty-stream",
        &json!({"bytes": 21_000_000}),
    );
    let (chunks, complete) = split(&events);
    assert_eq!(
        complete.fields["ErrorCode"], "Function.ResponseSizeTooLarge",
        "{complete:?}"
    );
    let streamed: usize = chunks.iter().map(|c| c.data().len()).sum();
    assert!(streamed <= 20 << 20, "{streamed} bytes streamed");
    assert!(streamed >= 19 << 20, "{streamed} bytes streamed");

    // A plain Invoke of a streaming function gets the whole stream as one payload.
    let answer = server
        .invoke("rusty-stream", &json!({"pause_ms": 10}))
        .await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    assert!(
        answer.body.ends_with(b"\0\0\0\0\0\0\0\0first\nsecond\n"),
        "{:?}",
        String::from_utf8_lossy(&answer.body)
    );
    server.stop();
}

/// `curl -s -i ARGS URL`: (status, headers lowercased, body).
pub(crate) fn curl(url: &str, args: &[&str]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "30"])
        .args(args)
        .arg(url)
        .output()
        .expect("running curl");
    assert!(out.status.success(), "curl {url} failed: {out:?}");
    parse_http(&out.stdout)
}

fn parse_http(raw: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, raw[end + 4..].to_vec())
}

pub(crate) fn header<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[tokio::test]
async fn function_urls_serve_http_requests_as_payload_format_2_events() {
    let Some(bins) = prerequisites(&["/usr/bin/node", "/usr/bin/python3", "/usr/bin/curl"]) else {
        return;
    };
    let mut web = FunctionDef::python_case("web", "http_echo");
    web.url = true;
    let mut bare = FunctionDef::python_case("bare", "http_bare");
    bare.url = true;
    let mut page = FunctionDef::new(
        "page",
        repo_path("tests/functions/node-cases"),
        "node",
        "cases.streamsPage",
    );
    page.url = true;
    let server = Server::start(bins, &[web, bare, page]);
    let web = server.function_url("web");

    // GET with a query string and cookies.
    let (status, headers, body) = curl(
        &format!("{web}some/path?a=1&a=2&b=x%20y"),
        &[
            "-A",
            "kindling-test",
            "-H",
            "Cookie: c1=v1; c2=v2",
            "-H",
            "X-Multi: one",
        ],
    );
    assert_eq!(status, 200, "{}", server.diagnostics());
    assert_eq!(header(&headers, "x-echo"), ["yes"]);
    assert_eq!(header(&headers, "set-cookie"), ["seen=1; Path=/"]);
    assert!(!header(&headers, "x-amzn-requestid").is_empty());
    let event: Value = serde_json::from_slice(&body).expect("the event as JSON");
    assert_eq!(event["version"], "2.0");
    assert_eq!(event["rawPath"], "/some/path");
    assert_eq!(event["rawQueryString"], "a=1&a=2&b=x%20y");
    assert_eq!(
        event["queryStringParameters"],
        json!({"a": "1,2", "b": "x y"})
    );
    assert_eq!(event["cookies"], json!(["c1=v1", "c2=v2"]));
    assert_eq!(event["headers"]["x-multi"], "one");
    assert!(event["headers"].get("cookie").is_none(), "{event}");
    assert_eq!(event["isBase64Encoded"], false);
    let ctx = &event["requestContext"];
    assert_eq!(ctx["http"]["method"], "GET");
    assert_eq!(ctx["http"]["path"], "/some/path");
    assert_eq!(ctx["http"]["sourceIp"], "127.0.0.1");
    assert_eq!(ctx["http"]["userAgent"], "kindling-test");
    assert_eq!(ctx["accountId"], "anonymous");
    assert_eq!(ctx["requestId"], header(&headers, "x-amzn-requestid")[0]);
    assert!(
        ctx["timeEpoch"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000_000),
        "{ctx}"
    );
    assert!(
        ctx["apiId"].as_str().is_some_and(|id| id.len() == 32),
        "{ctx}"
    );
    assert!(
        ctx["time"].as_str().is_some_and(|t| t.ends_with(" +0000")),
        "{ctx}"
    );

    // POST a binary body: base64 in the event; a JSON one: as text.
    let scratch = Scratch::new();
    let binary: Vec<u8> = (0..=255u8).chain([0, 0xff, 0x80]).collect();
    let file = scratch.path().join("body.bin");
    std::fs::write(&file, &binary).expect("writing the body");
    let (status, _, body) = curl(
        &format!("{web}upload?status=201"),
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", file.display()),
        ],
    );
    assert_eq!(status, 201);
    let event: Value = serde_json::from_slice(&body).expect("the event as JSON");
    assert_eq!(event["requestContext"]["http"]["method"], "POST");
    assert_eq!(event["isBase64Encoded"], true);
    let sent = base64::engine::general_purpose::STANDARD
        .decode(event["body"].as_str().expect("a body"))
        .expect("base64");
    assert_eq!(sent, binary);
    let (_, _, body) = curl(
        &web,
        &[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            r#"{"k":"v"}"#,
        ],
    );
    let event: Value = serde_json::from_slice(&body).expect("the event as JSON");
    assert_eq!(
        (&event["body"], &event["isBase64Encoded"]),
        (&json!(r#"{"k":"v"}"#), &json!(false))
    );

    // A body over 6 MB is refused before anything runs.
    let big = scratch.path().join("big.bin");
    std::fs::write(&big, vec![b'x'; 6_291_457]).expect("writing the body");
    let big = format!("@{}", big.display());
    // Without `Expect: 100-continue`, whose interim answer would come first.
    let (status, _, _) = curl(&web, &["-H", "Expect:", "--data-binary", &big]);
    assert_eq!(status, 413);

    // A response without statusCode: a 200 JSON answer of it.
    let (status, headers, body) = curl(&format!("{}x", server.function_url("bare")), &[]);
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), ["application/json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).expect("JSON"),
        json!({"bare": "/x"})
    );

    // A streamed response: head from the prelude, body lines as they are written.
    let url = format!("{}streamed", server.function_url("page"));
    let lines = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("curl")
            .args(["-s", "-N", "-i", "--max-time", "30", &url])
            .stdout(Stdio::piped())
            .spawn()
            .expect("running curl");
        let begun = Instant::now();
        let reader = BufReader::new(child.stdout.take().expect("stdout"));
        let lines: Vec<(f64, String)> = reader
            .lines()
            .map(|l| (begun.elapsed().as_secs_f64(), l.expect("a line")))
            .collect();
        child.wait().expect("curl ends");
        lines
    })
    .await
    .expect("the reader");
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.trim_end()).collect();
    assert!(text[0].starts_with("HTTP/1.1 207"), "{text:?}");
    assert!(text.contains(&"x-path: /streamed"), "{text:?}");
    assert!(text.contains(&"set-cookie: streamed=1"), "{text:?}");
    assert!(text.contains(&"content-type: text/plain"), "{text:?}");
    let at = |line: &str| lines.iter().find(|(_, l)| l == line).map(|(t, _)| *t);
    let (first, second) = (at("first").expect("first"), at("second").expect("second"));
    assert!(
        second - first >= 0.8,
        "lines {first:.3} s and {second:.3} s: {lines:?}"
    );
    server.stop();
}
