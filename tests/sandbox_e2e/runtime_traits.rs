//! Lambda's names and the traits of its runtimes, through `kindling serve` and the
//! sandbox (issue 10): qualified names and ARNs on the Invoke API; the Python runtime's
//! `bytes` results, caller context and nested handlers; the Node.js runtime's console
//! prefix, `trace`, `callbackWaitsForEmptyEventLoop`, nested handlers and `awslambda`
//! streaming handlers; and a function that brings its own bootstrap, whatever its handler.

use std::time::{Duration, Instant};

use kindling_runtime_api::client::InvokeOptions;
use serde_json::json;

use crate::support::{json, prerequisites, repo_path, request_id, FunctionDef, Server};

fn node_case(name: &str, handler: &str) -> FunctionDef {
    FunctionDef::new(
        name,
        repo_path("tests/functions/node-cases"),
        "node",
        &format!("cases.{handler}"),
    )
}

#[tokio::test]
async fn python_bytes_context_and_nested_handlers_by_qualified_names() {
    let Some(bins) = prerequisites(&["/usr/bin/python3"]) else {
        return;
    };
    let server = Server::start(
        bins,
        &[
            FunctionDef::python_case("raw", "raw_bytes"),
            FunctionDef::python_case("caller", "caller"),
            FunctionDef::python_case("deep", "nested.deeper.handler"),
        ],
    );
    // As boto3 sends a full ARN with a qualifier: percent-encoded.
    let arn = "arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Afunction%3Araw%3A%24LATEST";
    let answer = server.invoke(arn, &json!({"tail": "!"})).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    assert_eq!(answer.function_error, None);
    assert_eq!(&answer.body[..], b"\x00raw\xff!");

    let answer = server.invoke("caller:$LATEST", &json!({})).await;
    assert_eq!(
        json(&answer),
        json!({"identity": ["CognitoIdentity", null, null], "client_context": null})
    );
    let with_context = InvokeOptions {
        client_context: Some(r#"{"custom":{"k":"v"},"env":{"e":"1"}}"#.into()),
        ..InvokeOptions::default()
    };
    let answer = server
        .invoke_with("123456789012:function:caller", &json!({}), &with_context)
        .await;
    assert_eq!(
        json(&answer)["client_context"],
        json!({"custom": {"k": "v"}, "env": {"e": "1"}})
    );

    let answer = server.invoke("deep", &json!([1, 2])).await;
    assert_eq!(json(&answer), json!({"nested": [1, 2]}));

    // No alias exists: Lambda's 404, and nothing runs.
    let answer = server.invoke("deep:live", &json!({})).await;
    assert_eq!(answer.status, 404);
    assert_eq!(server.log("deep").matches("START RequestId").count(), 1);
    server.stop();
}

#[tokio::test]
async fn node_console_errors_event_loop_nesting_and_streaming_handlers() {
    let Some(bins) = prerequisites(&[]) else {
        return;
    };
    let server = Server::start(
        bins,
        &[
            node_case("version", "version"),
            FunctionDef::new(
                "esm",
                repo_path("tests/functions/node-esm"),
                "node",
                "index.handler",
            ),
            node_case("logs", "logs"),
            node_case("fails", "fails"),
            node_case("late", "late"),
            node_case("deep", "nested.deeper.handler"),
            node_case("streams", "streams"),
        ],
    );
    // Lambda's current Node.js (nodejs22.x), not Debian's 18; CommonJS and ES modules.
    let answer = server.invoke("version", &json!({})).await;
    assert_eq!(
        json(&answer),
        kindling_images::NODE_VERSION,
        "{}",
        server.diagnostics()
    );
    let answer = server.invoke("esm", &json!({"x": 1})).await;
    assert_eq!(
        json(&answer),
        json!({"esm": true, "node": kindling_images::NODE_VERSION, "event": {"x": 1}})
    );
    let answer = server.invoke("logs", &json!({})).await;
    assert_eq!(json(&answer), "logged", "{}", server.diagnostics());
    let id = request_id(&answer);
    let log = server.log("logs");
    for (level, message) in [
        ("INFO", "via log 1"),
        ("WARN", "via warn"),
        ("ERROR", "via error"),
    ] {
        let tail = format!("Z\t{id}\t{level}\t{message}\n");
        assert!(log.contains(&tail), "{tail:?} not in:\n{log}");
    }

    let answer = server.invoke("fails", &json!({"n": 11})).await;
    assert_eq!(answer.function_error.as_deref(), Some("Unhandled"));
    let body = json(&answer);
    assert_eq!(body["errorType"], "RangeError");
    assert_eq!(body["trace"][0], "RangeError: out of range: 11");
    assert_eq!(body.get("stackTrace"), None);

    let begun = Instant::now();
    let answer = server.invoke("late", &json!({"ms": 800})).await;
    assert_eq!(json(&answer), json!({"waits": true}));
    assert!(begun.elapsed() >= Duration::from_millis(800));
    let begun = Instant::now();
    let answer = server
        .invoke("late", &json!({"ms": 3000, "noWait": true}))
        .await;
    assert_eq!(json(&answer), json!({"waits": false}));
    assert!(begun.elapsed() < Duration::from_millis(3000));

    let answer = server.invoke("deep", &json!({"a": 1})).await;
    assert_eq!(json(&answer), json!({"nested": {"a": 1}}));

    let answer = server.invoke("streams", &json!({"n": 7})).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    let mut want = br#"{"statusCode":201}"#.to_vec();
    want.extend([0u8; 8]);
    want.extend(b"streamed 7");
    assert_eq!(&answer.body[..], &want[..]);
    server.stop();
}

#[tokio::test]
async fn a_function_with_its_own_bootstrap_starts_whatever_its_handler() {
    let Some(bins) = prerequisites(&["/usr/bin/python3"]) else {
        return;
    };
    // No module `handled` exists: the handler is the bootstrap's business.
    let server = Server::start(
        bins,
        &[FunctionDef::new(
            "own",
            repo_path("tests/functions/own-bootstrap"),
            "python",
            "handled.by.my.bootstrap",
        )],
    );
    let answer = server.invoke("own", &json!({"x": 1})).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    assert_eq!(
        json(&answer),
        json!({"served_by": "own bootstrap", "event": {"x": 1}})
    );
    assert!(server
        .log("own")
        .contains("own bootstrap for handler handled.by.my.bootstrap"));
    server.stop();
}
