//! Runtime API conformance and bad input, over the real Unix socket; the test plays the
//! guest with a plain HTTP client.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{read_answer, request};
use kindling_runtime_api::logs::{tail, LogSink, TAIL_BYTES};
use kindling_runtime_api::runtime_server::{Invocation, Outcome, RuntimeApi, Ticket};
use kindling_wire::frame::{self, Frame, FrameReader, FrameWriter};
use kindling_wire::{FunctionEnvironment, MAX_RESPONSE_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::timeout;

const NEXT: &str = "/2018-06-01/runtime/invocation/next";

struct Fixture {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    api: RuntimeApi,
    logs: Arc<LogSink>,
}

fn environment() -> FunctionEnvironment {
    FunctionEnvironment {
        function_name: "conf".into(),
        function_version: "$LATEST".into(),
        memory_mb: 128,
        timeout_ms: 3000,
        runtime: "provided".into(),
        handler: "h".into(),
        region: "us-east-1".into(),
        account_id: "123456789012".into(),
        log_group_name: "/aws/lambda/conf".into(),
        log_stream_name: "s".into(),
        initialization_type: "on-demand".into(),
        variables: BTreeMap::from([("K".to_string(), "V".to_string())]),
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vsock.sock_9001");
    let logs = Arc::new(LogSink::new(&dir.path().join("logs")).unwrap());
    let api = RuntimeApi::bind(&socket, environment(), logs.clone()).unwrap();
    Fixture {
        _dir: dir,
        socket,
        api,
        logs,
    }
}

impl Fixture {
    async fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket).await.unwrap()
    }

    fn submit(&self, id: &str, payload: &str) -> Ticket {
        self.api.submit(Invocation {
            request_id: id.into(),
            payload: Bytes::from(payload.to_string()),
            function_arn: "arn:aws:lambda:us-east-1:000000000000:function:conf".into(),
            trace_id: "Root=1-abc;Sampled=0".into(),
            client_context: Some(r#"{"custom":{"k":"v"}}"#.into()),
            cognito_identity: Some(r#"{"cognitoIdentityId":"x"}"#.into()),
            timeout: Duration::from_secs(3),
            entropy: None,
            network: None,
            stream: None,
        })
    }

    /// Submits `id` and takes it with `/next` on `conn`.
    async fn in_flight(&self, conn: &mut UnixStream, id: &str) -> Ticket {
        let ticket = self.submit(id, "{}");
        let next = request(conn, "GET", NEXT, &[], b"").await;
        assert_eq!(next.status, 200);
        assert_eq!(next.header("lambda-runtime-aws-request-id"), Some(id));
        ticket
    }
}

fn response_path(id: &str) -> String {
    format!("/2018-06-01/runtime/invocation/{id}/response")
}

fn error_path(id: &str) -> String {
    format!("/2018-06-01/runtime/invocation/{id}/error")
}

async fn outcome(ticket: Ticket) -> kindling_runtime_api::runtime_server::Completion {
    timeout(Duration::from_secs(5), ticket.done)
        .await
        .expect("no completion")
        .expect("completion dropped")
}

#[tokio::test]
async fn next_blocks_until_an_event_and_carries_every_header() {
    let f = fixture();
    let mut conn = f.connect().await;
    let waiting = tokio::spawn(async move {
        let a = request(&mut conn, "GET", NEXT, &[], b"").await;
        (a, conn)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "/next must block while there is no event"
    );

    let ticket = f.submit("req-1", r#"{"hello":"world"}"#);
    let (next, mut conn) = timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.status, 200);
    assert_eq!(next.body, br#"{"hello":"world"}"#);
    assert_eq!(next.header("lambda-runtime-aws-request-id"), Some("req-1"));
    assert_eq!(
        next.header("lambda-runtime-invoked-function-arn"),
        Some("arn:aws:lambda:us-east-1:000000000000:function:conf")
    );
    assert_eq!(
        next.header("lambda-runtime-trace-id"),
        Some("Root=1-abc;Sampled=0")
    );
    assert_eq!(
        next.header("lambda-runtime-client-context"),
        Some(r#"{"custom":{"k":"v"}}"#)
    );
    assert_eq!(
        next.header("lambda-runtime-cognito-identity"),
        Some(r#"{"cognitoIdentityId":"x"}"#)
    );
    let deadline: u128 = next
        .header("lambda-runtime-deadline-ms")
        .unwrap()
        .parse()
        .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    assert!(
        deadline > now + 2000 && deadline <= now + 3000,
        "deadline {deadline} vs now {now}"
    );

    let r = request(
        &mut conn,
        "POST",
        &response_path("req-1"),
        &[],
        b"the answer",
    )
    .await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json(), serde_json::json!({"status": "OK"}));
    assert!(ticket.dispatched.await.is_ok());
    let done = outcome(Ticket {
        dispatched: tokio::sync::oneshot::channel().1,
        done: ticket.done,
    })
    .await;
    assert_eq!(
        done.outcome,
        Outcome::Response(Bytes::from_static(b"the answer"))
    );
}

#[tokio::test]
async fn one_event_at_a_time() {
    let f = fixture();
    let (mut a, mut b) = (f.connect().await, f.connect().await);
    let first = f.submit("one", "1");
    let got_a = request(&mut a, "GET", NEXT, &[], b"").await;
    assert_eq!(got_a.header("lambda-runtime-aws-request-id"), Some("one"));
    // While "one" is in flight, a second /next is a state error, not a second event.
    let again = request(&mut b, "GET", NEXT, &[], b"").await;
    assert_eq!(again.status, 403);
    assert_eq!(again.json()["errorType"], "InvalidStateTransition");
    assert_eq!(
        request(&mut a, "POST", &response_path("one"), &[], b"r1")
            .await
            .status,
        202
    );
    assert_eq!(
        outcome(first).await.outcome,
        Outcome::Response(Bytes::from_static(b"r1"))
    );

    // Two runtimes wait; one event reaches exactly one of them.
    let wait = |mut c: UnixStream| {
        tokio::spawn(async move { request(&mut c, "GET", NEXT, &[], b"").await })
    };
    let (wa, wb) = (wait(a), wait(b));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _second = f.submit("two", "2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        u8::from(wa.is_finished()) + u8::from(wb.is_finished()),
        1,
        "exactly one /next gets the event"
    );
    wa.abort();
    wb.abort();
}

/// Headers and body the runtime posts; the error type recorded and the JSON the caller gets.
type ErrorCase = (
    &'static [(&'static str, &'static str)],
    &'static [u8],
    &'static str,
    serde_json::Value,
);

#[tokio::test]
async fn function_errors_are_normalised_and_passed_on() {
    let f = fixture();
    let mut c = f.connect().await;
    let cases: [ErrorCase; 4] = [
        (
            &[("Lambda-Runtime-Function-Error-Type", "Function.Custom")],
            br#"{"errorMessage":"m","errorType":"ValueError","stackTrace":["a"]}"#,
            "Function.Custom",
            serde_json::json!({"errorMessage":"m","errorType":"ValueError","stackTrace":["a"]}),
        ),
        (
            &[("Lambda-Runtime-Function-Error-Type", "Unhandled")],
            br#"{"errorMessage":"m","errorType":"Runtime.HandlerNotFound"}"#,
            "Runtime.HandlerNotFound",
            serde_json::json!({"errorMessage":"m","errorType":"Runtime.HandlerNotFound"}),
        ),
        (
            &[],
            b"{not json",
            "Runtime.Unknown",
            serde_json::json!({"errorMessage":"{not json","errorType":"Runtime.Unknown"}),
        ),
        (
            &[],
            b"",
            "Runtime.Unknown",
            serde_json::json!({"errorMessage":"","errorType":"Runtime.Unknown"}),
        ),
    ];
    for (i, (headers, body, want_type, want_body)) in cases.into_iter().enumerate() {
        let id = format!("e{i}");
        let ticket = f.in_flight(&mut c, &id).await;
        let r = request(&mut c, "POST", &error_path(&id), headers, body).await;
        assert_eq!(r.status, 202, "case {i}");
        match outcome(ticket).await.outcome {
            Outcome::FunctionError { error_type, body } => {
                assert_eq!(error_type, want_type, "case {i}");
                assert_eq!(
                    serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
                    want_body,
                    "case {i}"
                );
            }
            other => panic!("case {i}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn wrong_ids_and_wrong_order_are_refused_and_lose_nothing() {
    let f = fixture();
    let mut c = f.connect().await;
    // Nothing in flight: any answer is out of order.
    let r = request(&mut c, "POST", &response_path("ghost"), &[], b"x").await;
    assert_eq!(
        (r.status, r.json()["errorType"].as_str()),
        (403, Some("InvalidStateTransition"))
    );

    // Submitted but not yet taken with /next: answering it is out of order.
    let ticket = f.submit("early", "{}");
    let r = request(&mut c, "POST", &response_path("early"), &[], b"x").await;
    assert_eq!(
        (r.status, r.json()["errorType"].as_str()),
        (403, Some("InvalidStateTransition"))
    );
    let next = request(&mut c, "GET", NEXT, &[], b"").await;
    assert_eq!(next.header("lambda-runtime-aws-request-id"), Some("early"));

    // In flight: a wrong id is an invalid request id, for /response and /error.
    for path in [response_path("wrong"), error_path("wrong")] {
        let r = request(&mut c, "POST", &path, &[], b"x").await;
        assert_eq!(
            (r.status, r.json()["errorType"].as_str()),
            (400, Some("InvalidRequestID")),
            "{path}"
        );
    }
    // ... and the right one still goes through.
    assert_eq!(
        request(&mut c, "POST", &response_path("early"), &[], b"ok")
            .await
            .status,
        202
    );
    assert_eq!(
        outcome(ticket).await.outcome,
        Outcome::Response(Bytes::from_static(b"ok"))
    );
    // A second answer for the same id.
    for path in [response_path("early"), error_path("early")] {
        let r = request(&mut c, "POST", &path, &[], b"again").await;
        assert_eq!(
            (r.status, r.json()["errorType"].as_str()),
            (403, Some("InvalidStateTransition")),
            "{path}"
        );
    }
}

#[tokio::test]
async fn oversized_responses_get_413_and_the_caller_a_size_error() {
    let f = fixture();
    let mut c = f.connect().await;
    // Exactly the limit is fine.
    let ticket = f.in_flight(&mut c, "max").await;
    let body = vec![b'a'; MAX_RESPONSE_BYTES];
    assert_eq!(
        request(&mut c, "POST", &response_path("max"), &[], &body)
            .await
            .status,
        202
    );
    assert!(
        matches!(outcome(ticket).await.outcome, Outcome::Response(b) if b.len() == MAX_RESPONSE_BYTES)
    );

    // One byte more, announced by Content-Length: the answer comes after the whole
    // body was sent, on a connection that stays usable.
    let ticket = f.in_flight(&mut c, "big").await;
    let body = vec![b'a'; MAX_RESPONSE_BYTES + 1];
    let r = request(&mut c, "POST", &response_path("big"), &[], &body).await;
    assert_eq!(
        (r.status, r.json()["errorType"].as_str()),
        (413, Some("RequestEntityTooLarge"))
    );
    assert_eq!(
        request(&mut c, "GET", "/kindling/v1/environment", &[], b"")
            .await
            .status,
        200
    );
    match outcome(ticket).await.outcome {
        Outcome::Failed { error, reset } => {
            assert_eq!(error.error_type, "Function.ResponseSizeTooLarge");
            assert!(!reset);
        }
        other => panic!("{other:?}"),
    }

    // One byte more, chunked (no Content-Length to check up front).
    let mut c = f.connect().await;
    let ticket = f.in_flight(&mut c, "chunked").await;
    let mut raw = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        response_path("chunked")
    )
    .into_bytes();
    let chunk = vec![b'b'; MAX_RESPONSE_BYTES + 1];
    raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
    raw.extend_from_slice(&chunk);
    raw.extend_from_slice(b"\r\n0\r\n\r\n");
    let (mut rd, mut wr) = c.into_split();
    // The write half is handed back, not dropped: a half-closed connection is a gone client.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&raw).await;
        wr
    });
    let r = read_answer(&mut rd).await.expect("an answer");
    assert_eq!(r.status, 413);
    let _ = writer.await;
    assert!(
        matches!(outcome(ticket).await.outcome, Outcome::Failed { error, .. } if error.error_type == "Function.ResponseSizeTooLarge")
    );
}

#[tokio::test]
async fn an_oversized_error_fails_the_invocation_at_once() {
    let f = fixture();
    let mut c = f.connect().await;
    let ticket = f.in_flight(&mut c, "loud").await;
    let body = vec![b'e'; MAX_RESPONSE_BYTES + 1];
    let r = request(
        &mut c,
        "POST",
        &error_path("loud"),
        &[("Lambda-Runtime-Function-Error-Type", "Function.Oops")],
        &body,
    )
    .await;
    assert_eq!(
        (r.status, r.json()["errorType"].as_str()),
        (413, Some("RequestEntityTooLarge"))
    );
    // Completed now, not at the function's timeout (`outcome` gives up after 5 s).
    match outcome(ticket).await.outcome {
        Outcome::Failed { error, reset } => {
            assert_eq!(error.error_type, "Function.ResponseSizeTooLarge");
            assert!(
                error.error_message.contains("Error payload size exceeded"),
                "{}",
                error.error_message
            );
            assert!(!reset, "the environment itself is fine");
        }
        other => panic!("{other:?}"),
    }
    // A late answer for it is out of order; the connection still works.
    let r = request(&mut c, "POST", &error_path("loud"), &[], b"{}").await;
    assert_eq!(r.status, 403);
}

#[tokio::test]
async fn garbage_and_broken_clients_get_clear_answers_and_lose_nothing() {
    let f = fixture();
    let mut c = f.connect().await;
    let ticket = f.in_flight(&mut c, "keep").await;

    // Garbage bytes on a fresh connection: an HTTP 400, or the connection closed.
    let mut g = f.connect().await;
    g.write_all(b"\x00\x01\x02 definitely not HTTP\r\n\r\n")
        .await
        .unwrap();
    if let Some(a) = timeout(Duration::from_secs(5), read_answer(&mut g))
        .await
        .unwrap()
    {
        assert_eq!(a.status, 400);
    }

    // A client that goes away in the middle of a response body.
    let mut d = f.connect().await;
    d.write_all(
        format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",
            response_path("keep")
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    drop(d);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Unknown endpoints and methods.
    let r = request(&mut c, "GET", "/2018-06-01/runtime/nowhere", &[], b"").await;
    assert_eq!(r.status, 404);
    let r = request(&mut c, "DELETE", NEXT, &[], b"").await;
    assert_eq!(r.status, 405);
    let r = request(&mut c, "POST", "/kindling/v1/runtime/exit", &[], b"{oops").await;
    assert_eq!(
        (r.status, r.json()["errorType"].as_str()),
        (400, Some("InvalidRequestContent"))
    );

    // The invocation in flight survived all of that.
    assert_eq!(
        request(&mut c, "POST", &response_path("keep"), &[], b"kept")
            .await
            .status,
        202
    );
    assert_eq!(
        outcome(ticket).await.outcome,
        Outcome::Response(Bytes::from_static(b"kept"))
    );
}

#[tokio::test]
async fn an_abandoned_next_does_not_swallow_the_event() {
    let f = fixture();
    let mut gone = f.connect().await;
    gone.write_all(format!("GET {NEXT} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(gone);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ticket = f.submit("after", "{}");
    let mut c = f.connect().await;
    let next = timeout(
        Duration::from_secs(5),
        request(&mut c, "GET", NEXT, &[], b""),
    )
    .await
    .unwrap();
    assert_eq!(next.header("lambda-runtime-aws-request-id"), Some("after"));
    assert_eq!(
        request(&mut c, "POST", &response_path("after"), &[], b"ok")
            .await
            .status,
        202
    );
    assert_eq!(
        outcome(ticket).await.outcome,
        Outcome::Response(Bytes::from_static(b"ok"))
    );
}

#[tokio::test]
async fn init_errors_reach_the_invocation_that_triggered_the_init() {
    // Posted before the scheduler submitted anything: the next invocation gets it.
    let f = fixture();
    let mut c = f.connect().await;
    let r = request(
        &mut c,
        "POST",
        "/2018-06-01/runtime/init/error",
        &[(
            "Lambda-Runtime-Function-Error-Type",
            "Runtime.ImportModuleError",
        )],
        br#"{"errorMessage":"no module","errorType":"Runtime.ImportModuleError"}"#,
    )
    .await;
    assert_eq!(r.status, 202);
    match outcome(f.submit("first", "{}")).await.outcome {
        Outcome::InitError { error_type, body } => {
            assert_eq!(error_type, "Runtime.ImportModuleError");
            assert!(String::from_utf8_lossy(&body).contains("no module"));
        }
        other => panic!("{other:?}"),
    }
    // Posted while an invocation waits for /next: that one gets it.
    let ticket = f.submit("second", "{}");
    let r = request(
        &mut c,
        "POST",
        "/2018-06-01/runtime/init/error",
        &[],
        b"bad",
    )
    .await;
    assert_eq!(r.status, 202);
    assert!(
        matches!(outcome(ticket).await.outcome, Outcome::InitError { error_type, .. } if error_type == "Runtime.Unknown")
    );
}

#[tokio::test]
async fn kindling_endpoints_environment_logs_report_and_exit() {
    let f = fixture();
    let mut lines = f.logs.subscribe();
    let mut c = f.connect().await;
    let env = request(&mut c, "GET", "/kindling/v1/environment", &[], b"").await;
    assert_eq!(env.status, 200);
    assert_eq!(
        serde_json::from_slice::<FunctionEnvironment>(&env.body).unwrap(),
        environment()
    );

    let ticket = f.in_flight(&mut c, "r1").await;
    let r = request(
        &mut c,
        "POST",
        "/kindling/v1/logs",
        &[("Lambda-Runtime-Aws-Request-Id", "r1")],
        b"line one\nline two\n",
    )
    .await;
    assert_eq!(r.status, 202);
    // Bootstrap's report rides on the result.
    let report = r#"{"durationMs":1.5,"initDurationMs":20.0,"maxMemoryUsedMb":33}"#;
    assert_eq!(
        request(
            &mut c,
            "POST",
            &response_path("r1"),
            &[("Kindling-Invocation-Report", report)],
            b"{}"
        )
        .await
        .status,
        202
    );
    let done = outcome(ticket).await;
    assert_eq!(done.log, "line one\nline two\n");
    let report = done.report.unwrap();
    assert_eq!(
        (
            report.duration_ms,
            report.init_duration_ms,
            report.max_memory_used_mb
        ),
        (1.5, Some(20.0), 33)
    );
    assert_eq!(lines.recv().await.unwrap().text, "line one");
    assert_eq!(
        std::fs::read_to_string(f.logs.path("conf")).unwrap(),
        "line one\nline two\n"
    );

    let ticket = f.in_flight(&mut c, "r2").await;
    let r = request(
        &mut c,
        "POST",
        "/kindling/v1/runtime/exit",
        &[],
        br#"{"signal":9,"maxMemoryUsedMb":130}"#,
    )
    .await;
    assert_eq!(r.status, 202);
    let done = outcome(ticket).await;
    // The guest's last measure of the runtime goes into the failed invocation's report.
    assert_eq!(done.report.map(|r| r.max_memory_used_mb), Some(130));
    match done.outcome {
        Outcome::Failed { error, reset } => {
            assert!(reset);
            assert_eq!(error.error_type, "Runtime.ExitError");
            assert_eq!(
                error.error_message,
                "RequestId: r2 Error: Runtime exited with error: signal: killed"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_host_keeps_only_the_end_of_a_long_invocation_log() {
    let f = fixture();
    let mut c = f.connect().await;
    let ticket = f.in_flight(&mut c, "chatty").await;
    // 8 MiB of 1 KiB lines, in posts of 1 MiB (the most one post may carry).
    let line = |i: usize| format!("line {i:05} {}\n", "x".repeat(1012));
    let mut all = String::new();
    for post in 0..8 {
        let text: String = (post * 1024..(post + 1) * 1024).map(line).collect();
        let r = request(
            &mut c,
            "POST",
            "/kindling/v1/logs",
            &[("Lambda-Runtime-Aws-Request-Id", "chatty")],
            text.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 202);
        all.push_str(&text);
    }
    assert_eq!(
        request(&mut c, "POST", &response_path("chatty"), &[], b"{}")
            .await
            .status,
        202
    );
    let done = outcome(ticket).await;
    // The invocation holds the end of its log, enough for the caller's tail, not 8 MiB.
    assert!(
        done.log.len() <= 2 * TAIL_BYTES,
        "{} bytes of log held in memory",
        done.log.len()
    );
    assert!(done.log.len() >= TAIL_BYTES);
    assert!(all.ends_with(&done.log));
    assert_eq!(tail(&done.log), tail(&all));
    // The whole log went to the function's file.
    assert_eq!(std::fs::read_to_string(f.logs.path("conf")).unwrap(), all);
}

#[tokio::test]
async fn an_unreadable_report_is_dropped_but_the_result_counts() {
    let f = fixture();
    let mut c = f.connect().await;
    let ticket = f.in_flight(&mut c, "r9").await;
    let r = request(
        &mut c,
        "POST",
        &response_path("r9"),
        &[("Kindling-Invocation-Report", "{not json")],
        b"\"kept\"",
    )
    .await;
    assert_eq!(r.status, 202);
    let done = outcome(ticket).await;
    assert!(done.report.is_none());
    assert!(
        matches!(&done.outcome, Outcome::Response(body) if &body[..] == b"\"kept\""),
        "{:?}",
        done.outcome
    );
}

/// Upgrades `conn` to a frame stream as the agent does; the host's 101 is read whole.
async fn upgrade(conn: &mut UnixStream) {
    let ask = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nUpgrade: {}\r\nConnection: upgrade\r\n\r\n",
        kindling_wire::PATH_STREAM,
        frame::PROTOCOL
    );
    conn.write_all(ask.as_bytes()).await.unwrap();
    let answer = read_answer(conn).await.expect("an answer to the upgrade");
    assert_eq!(answer.status, 101);
    assert_eq!(answer.header("upgrade"), Some(frame::PROTOCOL));
}

fn call(seq: u32, method: &str, path: &str, body: &'static [u8]) -> Frame {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .body(Bytes::from_static(body))
        .unwrap();
    Frame::Request { seq, request }
}

async fn answer(
    reader: &mut FrameReader<tokio::net::unix::OwnedReadHalf>,
) -> (u32, http::Response<Bytes>) {
    match timeout(Duration::from_secs(5), reader.next()).await {
        Ok(Ok(Some(Frame::Response { seq, response }))) => (seq, response),
        other => panic!("expected an answer frame: {other:?}"),
    }
}

#[tokio::test]
async fn a_frame_stream_carries_next_and_results_answered_as_they_finish() {
    let f = fixture();
    let mut conn = f.connect().await;
    upgrade(&mut conn).await;
    let (reader, writer) = conn.into_split();
    let (mut reader, mut writer) = (FrameReader::new(reader), FrameWriter::new(writer));

    // A /next waits for its event while a log post behind it is answered first.
    writer.send(&call(1, "GET", NEXT, b"")).await.unwrap();
    writer
        .send(&call(2, "POST", kindling_wire::PATH_LOGS, b"a log line\n"))
        .await
        .unwrap();
    let (seq, logged) = answer(&mut reader).await;
    assert_eq!((seq, logged.status().as_u16()), (2, 202));
    let ticket = f.submit("framed-1", r#"{"x":1}"#);
    let (seq, event) = answer(&mut reader).await;
    assert_eq!((seq, event.status().as_u16()), (1, 200));
    assert_eq!(event.headers()["lambda-runtime-aws-request-id"], "framed-1");
    assert!(event.headers().contains_key("lambda-runtime-deadline-ms"));
    assert_eq!(&event.body()[..], br#"{"x":1}"#);

    // Refusals come back as frames too, and lose nothing.
    writer
        .send(&call(3, "POST", &response_path("someone-else"), b"no"))
        .await
        .unwrap();
    let (seq, refused) = answer(&mut reader).await;
    assert_eq!((seq, refused.status().as_u16()), (3, 400));
    writer
        .send(&call(4, "POST", &response_path("framed-1"), b"done"))
        .await
        .unwrap();
    let (seq, accepted) = answer(&mut reader).await;
    assert_eq!((seq, accepted.status().as_u16()), (4, 202));
    assert_eq!(
        outcome(ticket).await.outcome,
        Outcome::Response(Bytes::from_static(b"done"))
    );
    let seen = f.api.exchanges();
    assert_eq!(
        (seen.streams, seen.http, seen.framed),
        (1, 0, 4),
        "{seen:?}"
    );

    // A frame past the limit ends its stream before its bytes are read.
    let mut header = Vec::from((u32::try_from(frame::MAX_FRAME).unwrap() + 1).to_be_bytes());
    header.push(1);
    let mut raw = f.connect().await;
    upgrade(&mut raw).await;
    raw.write_all(&header).await.unwrap();
    let mut rest = Vec::new();
    let closed = timeout(Duration::from_secs(5), raw.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    // The first stream lives on: its next /next gets the next event.
    writer.send(&call(5, "GET", NEXT, b"")).await.unwrap();
    let _ticket = f.submit("after", "{}");
    let (seq, event) = answer(&mut reader).await;
    assert_eq!((seq, event.status().as_u16()), (5, 200));
    assert_eq!(event.headers()["lambda-runtime-aws-request-id"], "after");
}
