//! The bootstrap against the host's real Runtime API server (`kindling-runtime-api`),
//! rather than this crate's test host: both halves of the wire agree, streamed responses
//! included.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{function_env, have, Guest, PATIENCE};
use kindling_runtime_api::logs::LogSink;
use kindling_runtime_api::runtime_server::{Invocation, Outcome, RuntimeApi};
use kindling_runtime_api::streaming::{self, StreamEvent};

const APP: &str = r#"
def handler(event, context):
    print("handling", context.aws_request_id)
    if event.get("fail"):
        raise KeyError("missing")
    return {"hello": event["name"]}
"#;

fn invocation(n: u32, payload: &str) -> Invocation {
    Invocation {
        request_id: format!("c0ffee00-0000-4000-8000-{n:012}"),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        function_arn: "arn:aws:lambda:eu-west-1:000000000000:function:test-fn".into(),
        trace_id: format!("Root=1-00000000-{n:024}"),
        client_context: None,
        cognito_identity: None,
        timeout: Duration::from_secs(30),
        entropy: None,
        network: None,
        stream: None,
    }
}

#[tokio::test]
async fn python_function_through_the_host_runtime_api() {
    if !have("python3") {
        return;
    }
    let guest = Guest::new();
    guest.write_task("app.py", APP, false);
    let logs = Arc::new(LogSink::new(&guest.dir.path().join("logs")).unwrap());
    let api =
        RuntimeApi::bind(&guest.socket(), function_env("python", "app.handler"), logs).unwrap();
    let _bootstrap = guest.start(Some(&guest.shipped_runtime("python")));

    let first = invocation(1, r#"{"name":"kindling"}"#);
    let id = first.request_id.clone();
    let done = tokio::time::timeout(PATIENCE, api.submit(first).done)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        done.outcome,
        Outcome::Response(Bytes::from_static(br#"{"hello": "kindling"}"#))
    );
    let report = done.report.expect("a report");
    assert!(
        report.init_duration_ms.is_some() && report.max_memory_used_mb > 0,
        "{report:?}"
    );
    assert!(done.log.contains(&format!("handling {id}")), "{}", done.log);

    let second = invocation(2, r#"{"fail":true}"#);
    let done = tokio::time::timeout(PATIENCE, api.submit(second).done)
        .await
        .unwrap()
        .unwrap();
    let Outcome::FunctionError { body, .. } = &done.outcome else {
        panic!("{:?}", done.outcome)
    };
    let error: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(error["errorType"], "KeyError");
    assert!(done.report.expect("a report").init_duration_ms.is_none());

    // Only the configuration came over HTTP: the agent upgraded one connection to a frame
    // stream, and both events, both results and the log lines took it.
    let seen = api.exchanges();
    assert_eq!((seen.streams, seen.http), (1, 1), "{seen:?}");
    assert!(seen.framed >= 4, "{seen:?}");

    // The host restarts (as a snapshot's restore resets every vsock connection): the
    // stream breaks under the waiting /next, and the agent negotiates a new one.
    drop(api);
    let logs = Arc::new(LogSink::new(&guest.dir.path().join("logs2")).unwrap());
    let api =
        RuntimeApi::bind(&guest.socket(), function_env("python", "app.handler"), logs).unwrap();
    let done = tokio::time::timeout(
        PATIENCE,
        api.submit(invocation(3, r#"{"name":"again"}"#)).done,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        done.outcome,
        Outcome::Response(Bytes::from_static(br#"{"hello": "again"}"#))
    );
    let seen = api.exchanges();
    assert_eq!((seen.streams, seen.http), (1, 0), "{seen:?}");
}

const STREAMING_APP: &str = r#"
exports.handler = awslambda.streamifyResponse(async (event, stream) => {
  console.log('streaming');
  stream.write('first\n');
  await new Promise((r) => setTimeout(r, 700));
  if (event.fail) throw new TypeError('broke in mid-stream');
  stream.end('second\n');
});
"#;

/// The next chunk of a stream, and when it came.
async fn chunk(events: &mut tokio::sync::mpsc::Receiver<StreamEvent>) -> (Bytes, Instant) {
    match tokio::time::timeout(PATIENCE, events.recv()).await {
        Ok(Some(StreamEvent::Chunk(c))) => (c, Instant::now()),
        other => panic!("expected a chunk: {other:?}"),
    }
}

#[tokio::test]
async fn a_node_stream_reaches_the_host_chunk_by_chunk() {
    if !have("node") {
        return;
    }
    let guest = Guest::new();
    guest.write_task("app.js", STREAMING_APP, false);
    let logs = Arc::new(LogSink::new(&guest.dir.path().join("logs")).unwrap());
    let api = RuntimeApi::bind(&guest.socket(), function_env("node", "app.handler"), logs).unwrap();
    let _bootstrap = guest.start(Some(&guest.shipped_runtime("node")));

    let (sink, mut events) = streaming::channel();
    let mut first = invocation(1, "{}");
    first.stream = Some(sink);
    let ticket = api.submit(first);
    match tokio::time::timeout(PATIENCE, events.recv()).await {
        Ok(Some(StreamEvent::Start { content_type })) => {
            assert_eq!(content_type.as_deref(), Some("application/octet-stream"));
        }
        other => panic!("expected the stream's start: {other:?}"),
    }
    let (data, first_at) = chunk(&mut events).await;
    assert_eq!(&data[..], b"first\n");
    let (data, second_at) = chunk(&mut events).await;
    assert_eq!(&data[..], b"second\n");
    // Relayed as written, not gathered: the handler's pause is between the two.
    assert!(second_at - first_at >= Duration::from_millis(500));
    let done = tokio::time::timeout(PATIENCE, ticket.done)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.outcome, Outcome::Response(Bytes::new()));
    // The report is taken at the stream's end: its duration covers the pause.
    let report = done.report.expect("a report");
    assert!(report.duration_ms >= 600.0, "{report:?}");
    assert!(done.log.contains("streaming"), "{}", done.log);

    // A failure in mid-stream: the chunk before it went out, then the error.
    let (sink, mut events) = streaming::channel();
    let mut second = invocation(2, r#"{"fail":true}"#);
    second.stream = Some(sink);
    let ticket = api.submit(second);
    assert!(matches!(
        tokio::time::timeout(PATIENCE, events.recv()).await,
        Ok(Some(StreamEvent::Start { .. }))
    ));
    assert_eq!(&chunk(&mut events).await.0[..], b"first\n");
    let done = tokio::time::timeout(PATIENCE, ticket.done)
        .await
        .unwrap()
        .unwrap();
    let Outcome::FunctionError { body, .. } = &done.outcome else {
        panic!("{:?}", done.outcome)
    };
    let error: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(error["errorType"], "TypeError");
    assert_eq!(error["errorMessage"], "broke in mid-stream");

    // Without a sink (a plain Invoke), the stream is gathered into one payload.
    let done = tokio::time::timeout(PATIENCE, api.submit(invocation(3, "{}")).done)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        done.outcome,
        Outcome::Response(Bytes::from_static(b"first\nsecond\n"))
    );
}
