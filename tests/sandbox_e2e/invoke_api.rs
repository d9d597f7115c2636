//! The Invoke API's own behaviour around a working function: concurrency across
//! environments, the log tail, Event and DryRun invocations, unknown functions.

use kindling_runtime_api::client::{InvocationType, InvokeOptions};
use serde_json::json;
use std::collections::BTreeSet;

use crate::support::{eventually, json, prerequisites, request_id, FunctionDef, Server};

const PYTHON: &[&str] = &["/usr/bin/python3"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_invocations_share_four_environments() {
    let Some(bins) = prerequisites(PYTHON) else {
        return;
    };
    let mut echo = FunctionDef::python_case("echo", "echo");
    echo.max_concurrency = 4;
    let server = std::sync::Arc::new(Server::start(bins, &[echo]));
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let server = server.clone();
            tokio::spawn(async move {
                let answer = server
                    .invoke("echo", &json!({"id": i, "sleep": 0.02}))
                    .await;
                (i, answer)
            })
        })
        .collect();
    let mut environments = BTreeSet::new();
    for call in calls {
        let (i, answer) = call.await.expect("an invocation task");
        assert_eq!(answer.status, 200, "call {i}: {}", server.diagnostics());
        assert_eq!(answer.function_error, None, "call {i}");
        let body = json(&answer);
        assert_eq!(body["id"], i, "call {i} got another's answer: {body}");
        assert_eq!(body["request_id"], request_id(&answer).as_str());
        environments.insert(body["stream"].as_str().expect("stream").to_string());
    }
    assert_eq!(environments.len(), 4, "{environments:?}");
    let server = std::sync::Arc::into_inner(server).expect("every call is done");
    server.stop();
}

#[tokio::test]
async fn the_log_tail_frames_the_invocation() {
    let Some(bins) = prerequisites(PYTHON) else {
        return;
    };
    let server = Server::start(bins, &[FunctionDef::python_case("echo", "echo")]);
    let tail_of = |answer: &kindling_runtime_api::client::InvokeResponse| {
        let rid = request_id(answer);
        let tail = answer.log_tail.clone().expect("X-Amz-Log-Result");
        let report = tail
            .lines()
            .find(|l| l.starts_with(&format!("REPORT RequestId: {rid}\t")))
            .unwrap_or_else(|| panic!("no REPORT line in {tail}"))
            .to_string();
        assert!(tail.contains(&format!("START RequestId: {rid} Version: $LATEST")));
        assert!(tail.contains(&format!("END RequestId: {rid}")));
        for field in [
            "Duration: ",
            "Billed Duration: ",
            "Memory Size: 128 MB",
            "Max Memory Used: ",
        ] {
            assert!(report.contains(field), "{field:?} not in {report:?}");
        }
        report
    };
    let options = InvokeOptions {
        log_tail: true,
        ..InvokeOptions::default()
    };
    let cold = server
        .invoke_with("echo", &json!({"id": "t1"}), &options)
        .await;
    assert!(cold
        .log_tail
        .as_deref()
        .unwrap_or_default()
        .contains("echo t1"));
    assert!(tail_of(&cold).contains("Init Duration: "));
    let warm = server
        .invoke_with("echo", &json!({"id": "t2"}), &options)
        .await;
    assert!(!tail_of(&warm).contains("Init Duration"));
    // Without the header, no tail.
    let plain = server.invoke("echo", &json!({"id": "t3"})).await;
    assert!(plain.headers.get("x-amz-log-result").is_none());
    server.stop();
}

#[tokio::test]
async fn an_event_invocation_is_accepted_then_runs() {
    let Some(bins) = prerequisites(PYTHON) else {
        return;
    };
    let server = Server::start(bins, &[FunctionDef::python_case("echo", "echo")]);
    let options = InvokeOptions {
        invocation_type: InvocationType::Event,
        ..InvokeOptions::default()
    };
    let marker = format!("event-{}", std::process::id());
    let answer = server
        .invoke_with("echo", &json!({"id": marker}), &options)
        .await;
    assert_eq!(answer.status, 202, "{}", server.diagnostics());
    assert!(answer.body.is_empty());
    eventually(&format!("the event {marker} runs"), || {
        server.log("echo").contains(&format!("echo {marker}"))
    })
    .await;
    server.stop();
}

#[tokio::test]
async fn dry_run_answers_204_and_unknown_functions_404() {
    let Some(bins) = prerequisites(PYTHON) else {
        return;
    };
    let server = Server::start(bins, &[FunctionDef::python_case("echo", "echo")]);
    let options = InvokeOptions {
        invocation_type: InvocationType::DryRun,
        ..InvokeOptions::default()
    };
    let dry = server.invoke_with("echo", &json!({}), &options).await;
    assert_eq!(dry.status, 204);
    assert!(dry.body.is_empty());
    assert!(server.env_dirs().is_empty(), "a dry run starts nothing");
    assert!(
        !server.log("echo").contains("START"),
        "a dry run runs nothing"
    );

    let missing = server.invoke("nobody", &json!({})).await;
    assert_eq!(missing.status, 404);
    assert_eq!(
        missing
            .headers
            .get("x-amzn-errortype")
            .map(|v| v.as_bytes()),
        Some(&b"ResourceNotFoundException"[..])
    );
    let body = json(&missing);
    let message = body["Message"].as_str().expect("Message");
    assert!(
        message.starts_with("Function not found: arn:aws:lambda:")
            && message.ends_with(":function:nobody"),
        "{message}"
    );
    server.stop();
}
