//! The bootstrap against the host's real Runtime API server (`kindling-runtime-api`),
//! rather than this crate's test host: both halves of the wire agree.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{function_env, have, shipped_runtime, Guest, PATIENCE};
use kindling_runtime_api::logs::LogSink;
use kindling_runtime_api::runtime_server::{Invocation, Outcome, RuntimeApi};

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
    let _bootstrap = guest.start(Some(&shipped_runtime("python")));

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
}
