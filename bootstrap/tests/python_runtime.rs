//! The shipped Python runtime (`guest_images/runtimes/python`) behind the real bootstrap.

mod common;

use common::{json_of, start_shipped, Guest, Host, Record};
use serde_json::{json, Value};

const APP: &str = r#"
import ctypes
import json
import logging
import os

logger = logging.getLogger()
logger.setLevel(logging.INFO)
calls = 0
c_getenv = ctypes.CDLL(None).getenv
c_getenv.restype = ctypes.c_char_p

def handler(event, context):
    global calls
    calls += 1
    print("event", json.dumps(event))
    logger.info("info from the handler")
    if "raise" in event:
        raise ValueError("bad value " + str(event["raise"]))
    if "big" in event:
        return "x" * event["big"]
    return {
        "event": event,
        "calls": calls,
        "aws_request_id": context.aws_request_id,
        "function_name": context.function_name,
        "function_version": context.function_version,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "invoked_function_arn": context.invoked_function_arn,
        "log_group_name": context.log_group_name,
        "log_stream_name": context.log_stream_name,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "identity": context.identity.cognito_identity_id if context.identity else None,
        "client_custom": context.client_context.custom if context.client_context else None,
        "trace_id": os.environ.get("_X_AMZN_TRACE_ID"),
        # The process's C environment never holds a per-invocation value.
        "trace_id_in_c_env": c_getenv(b"_X_AMZN_TRACE_ID") is not None,
        "greeting": os.environ.get("GREETING"),
    }
"#;

/// What awslambdaric gives a handler beyond the event: the context's caller objects,
/// and a `bytes` result sent as it is.
const CALLER: &str = r#"
def handler(event, context):
    if "bytes" in event:
        return event["bytes"].encode() + b"\x00\xff"
    if "bytearray" in event:
        return bytearray(b"no")
    i, cc = context.identity, context.client_context
    return {
        "identity": [type(i).__name__, i.cognito_identity_id, i.cognito_identity_pool_id],
        "client_context": None if cc is None else {
            "custom": cc.custom,
            "env": cc.env,
            "client": None if cc.client is None else [cc.client.app_title, cc.client.installation_id],
        },
    }
"#;

/// A handler found through a module's attributes (`nested.outer.inner.deep`).
const NESTED: &str = r#"
class Inner:
    @staticmethod
    def deep(event, context):
        return {"nested": event}

inner = Inner()

class Outer:
    inner = Inner()

outer = Outer()
"#;

/// A function that imports `logging` only while it runs: the runtime has not imported it
/// (nor `http.client`'s `ssl` and `email`, nor `socket` and its `selectors`) for its own
/// cold start, and Lambda's log format is still there once the function does.
const LATE_LOGGING: &str = r#"
import sys

def handler(event, context):
    before = sorted(m for m in ("logging", "http.client", "ssl", "email", "socket", "selectors")
                    if m in sys.modules)
    import logging
    logging.getLogger().setLevel(logging.INFO)
    logging.info("late info")
    return {"before": before, "handlers": len(logging.getLogger().handlers)}
"#;

/// Measures the event it gets: a large one arrives over the runtime's socket in many reads.
const SIZE: &str = r#"
def handler(event, context):
    return {"len": len(event["pad"]), "only_y": set(event["pad"]) == {"y"}}
"#;

/// A module that fails while it is imported, in a function of its own.
const BROKEN: &str = "def helper():\n    raise KeyError('at import')\n\nhelper()\n";

fn start(handler: &str) -> Option<(Guest, Host, common::Bootstrap)> {
    start_shipped(
        "python",
        "python3",
        &[
            ("app.py", APP),
            ("caller.py", CALLER),
            ("nested.py", NESTED),
            ("broken.py", BROKEN),
            ("late.py", LATE_LOGGING),
            ("size.py", SIZE),
        ],
        handler,
    )
}

#[tokio::test]
async fn logging_imported_late_gets_lambdas_format() {
    let Some((_guest, mut host, _bootstrap)) = start("late.handler") else {
        return;
    };
    for round in 0..2 {
        let id = host.invoke("{}");
        let out = json_of(&host.result(&id).await);
        let before = if round == 0 {
            json!([])
        } else {
            json!(["logging"])
        };
        assert_eq!(
            out,
            json!({"before": before, "handlers": 1}),
            "round {round}"
        );
        let logs = host.logs(Some(&id));
        assert!(
            logs.contains("[INFO]\t") && logs.contains(&format!("\t{id}\tlate info\n")),
            "{logs}"
        );
    }
}

#[tokio::test]
async fn handler_returns_with_a_lambda_context() {
    let Some((_guest, mut host, _bootstrap)) = start("app.handler") else {
        return;
    };
    let id = host.invoke_with(
        r#"{"name":"kindling"}"#,
        vec![
            (
                "Lambda-Runtime-Cognito-Identity".into(),
                r#"{"cognitoIdentityId":"cid","cognitoIdentityPoolId":"pool"}"#.into(),
            ),
            (
                "Lambda-Runtime-Client-Context".into(),
                r#"{"custom":{"k":"v"},"env":{},"client":{"app_title":"t"}}"#.into(),
            ),
        ],
    );
    let record = host.result(&id).await;
    assert!(matches!(record, Record::Response { .. }), "{record:?}");
    let out = json_of(&record);
    assert_eq!(out["event"], json!({"name": "kindling"}));
    assert_eq!(out["aws_request_id"], json!(id));
    assert_eq!(out["function_name"], "test-fn");
    assert_eq!(out["function_version"], "$LATEST");
    assert_eq!(out["memory_limit_in_mb"], "256");
    assert_eq!(
        out["invoked_function_arn"],
        "arn:aws:lambda:eu-west-1:000000000000:function:test-fn"
    );
    assert_eq!(out["log_group_name"], "/aws/lambda/test-fn");
    assert_eq!(out["log_stream_name"], "2026/11/27/[$LATEST]abc");
    let remaining = out["remaining_ms"].as_i64().unwrap();
    assert!(remaining > 20_000 && remaining <= 30_000, "{out}");
    assert_eq!(out["identity"], "cid");
    assert_eq!(out["client_custom"], json!({"k": "v"}));
    assert!(
        out["trace_id"]
            .as_str()
            .unwrap()
            .starts_with("Root=1-5bef4de7-"),
        "{out}"
    );
    assert_eq!(out["trace_id_in_c_env"], false);
    assert_eq!(out["greeting"], "hi");

    let logs = host.logs(Some(&id));
    assert!(logs.contains("event {\"name\": \"kindling\"}\n"), "{logs}");
    assert!(
        logs.contains("[INFO]\t") && logs.contains(&format!("\t{id}\tinfo from the handler\n")),
        "{logs}"
    );

    // Warm: the same process serves the next invocation, with its own trace id.
    let next = host.invoke("{}");
    let out2 = json_of(&host.result(&next).await);
    assert_eq!(out2["calls"], 2);
    assert_ne!(out2["trace_id"], out["trace_id"]);
    assert!(host.report(&next).init_duration_ms.is_none());
}

#[tokio::test]
async fn handler_that_raises_posts_a_lambda_error() {
    let Some((_guest, mut host, _bootstrap)) = start("app.handler") else {
        return;
    };
    let id = host.invoke(r#"{"raise": 7}"#);
    let record = host.result(&id).await;
    assert!(matches!(record, Record::Error { .. }), "{record:?}");
    let err = json_of(&record);
    assert_eq!(err["errorType"], "ValueError");
    assert_eq!(err["errorMessage"], "bad value 7");
    assert_eq!(err["requestId"], json!(id));
    // The function's frames only, as AWS's runtime trims its own.
    let trace = err["stackTrace"].as_array().unwrap();
    assert_eq!(trace.len(), 1, "{err}");
    assert!(
        trace[0].as_str().unwrap().contains("app.py\", line "),
        "{err}"
    );
    assert!(
        host.logs(Some(&id))
            .contains("[ERROR] ValueError: bad value 7\n"),
        "{:#?}",
        host.history
    );
    assert!(host.report(&id).duration_ms > 0.0);

    // The runtime lives on after a function error.
    let ok = host.invoke("{}");
    assert!(matches!(host.result(&ok).await, Record::Response { .. }));
}

#[tokio::test]
async fn large_response_is_relayed_whole() {
    let Some((_guest, mut host, _bootstrap)) = start("app.handler") else {
        return;
    };
    let size = 5 * 1024 * 1024;
    let id = host.invoke(&format!(r#"{{"big": {size}}}"#));
    let Record::Response { body, .. } = host.result(&id).await else {
        panic!("{:#?}", host.history)
    };
    assert_eq!(body.len(), size + 2); // a JSON string: quotes around the x's
    assert!(body[1..body.len() - 1].iter().all(|&b| b == b'x'));
    assert!(
        host.report(&id).max_memory_used_mb >= 5,
        "{:?}",
        host.report(&id)
    );
}

#[tokio::test]
async fn large_event_reaches_the_handler_whole() {
    let Some((_guest, mut host, _bootstrap)) = start("size.handler") else {
        return;
    };
    let size = 5 * 1024 * 1024 + 17;
    let id = host.invoke(&format!(r#"{{"pad": "{}"}}"#, "y".repeat(size)));
    let out = json_of(&host.result(&id).await);
    assert_eq!(out, json!({"len": size, "only_y": true}));
}

#[tokio::test]
async fn missing_module_is_an_init_error_then_the_runtime_exits() {
    let Some((_guest, mut host, _bootstrap)) = start("nothere.handler") else {
        return;
    };
    let (headers, body) = host
        .wait_for("an init error", |r| match r {
            Record::InitError { headers, body } => Some((headers.clone(), body.clone())),
            _ => None,
        })
        .await;
    let err: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(err["errorType"], "Runtime.ImportModuleError");
    assert!(
        err["errorMessage"]
            .as_str()
            .unwrap()
            .contains("Unable to import module 'nothere'"),
        "{err}"
    );
    assert_eq!(
        headers["lambda-runtime-function-error-type"],
        "Runtime.ImportModuleError"
    );
    let exit = host.exit().await;
    assert_eq!((exit.request_id, exit.exit_code), (None, Some(1)));
}

#[tokio::test]
async fn missing_handler_function_is_an_init_error() {
    let Some((_guest, mut host, _bootstrap)) = start("app.nothere") else {
        return;
    };
    let err = host.init_error().await;
    assert_eq!(err["errorType"], "Runtime.HandlerNotFound");
}

#[tokio::test]
async fn the_deadline_moves_onto_the_guest_clock() {
    let Some((_guest, mut host, _bootstrap)) = start("app.handler") else {
        return;
    };
    // The host's clock reads 100 s less than ours: its deadline, 30 s after our "now",
    // is 130 s away on its clock, and so on ours.
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        - 100_000;
    let id = host.invoke_with(
        "{}",
        vec![("Kindling-Host-Time-Ms".into(), host_now.to_string())],
    );
    let out = json_of(&host.result(&id).await);
    let remaining = out["remaining_ms"].as_i64().unwrap();
    assert!((120_000..=130_000).contains(&remaining), "{out}");
}

#[tokio::test]
async fn bytes_are_returned_as_they_are() {
    let Some((_guest, mut host, _bootstrap)) = start("caller.handler") else {
        return;
    };
    let id = host.invoke(r#"{"bytes": "raw"}"#);
    let Record::Response { body, headers, .. } = host.result(&id).await else {
        panic!("{:#?}", host.history)
    };
    assert_eq!(&body[..], b"raw\x00\xff");
    assert_eq!(headers["content-type"], "application/unknown");
    // awslambdaric sends `bytes` only: a bytearray is not JSON.
    let id = host.invoke(r#"{"bytearray": 1}"#);
    let err = json_of(&host.result(&id).await);
    assert_eq!(err["errorType"], "Runtime.MarshalError");
    assert_eq!(err["stackTrace"], json!([]));
}

#[tokio::test]
async fn identity_and_client_context_as_awslambdaric_builds_them() {
    let Some((_guest, mut host, _bootstrap)) = start("caller.handler") else {
        return;
    };
    // Nothing from the caller: an identity whose ids are None, no client context.
    let id = host.invoke("{}");
    assert_eq!(
        json_of(&host.result(&id).await),
        json!({"identity": ["CognitoIdentity", null, null], "client_context": null})
    );
    let id = host.invoke_with(
        "{}",
        vec![
            (
                "Lambda-Runtime-Cognito-Identity".into(),
                r#"{"cognitoIdentityId":"cid","cognitoIdentityPoolId":"pool"}"#.into(),
            ),
            (
                "Lambda-Runtime-Client-Context".into(),
                r#"{"custom":{"k":"v"},"env":{"platform":"x"},"client":{"app_title":"t"}}"#.into(),
            ),
        ],
    );
    assert_eq!(
        json_of(&host.result(&id).await),
        json!({
            "identity": ["CognitoIdentity", "cid", "pool"],
            "client_context": {"custom": {"k": "v"}, "env": {"platform": "x"}, "client": ["t", null]},
        })
    );
    let id = host.invoke_with(
        "{}",
        vec![("Lambda-Runtime-Client-Context".into(), "{not json".into())],
    );
    let err = json_of(&host.result(&id).await);
    assert_eq!(err["errorType"], "Runtime.LambdaContextUnmarshalError");
    assert!(
        err["errorMessage"]
            .as_str()
            .unwrap()
            .starts_with("Unable to parse Client Context JSON: "),
        "{err}"
    );
}

#[tokio::test]
async fn nested_handlers_are_found_through_attributes() {
    // Three attributes deep: `nested.outer.inner` and `nested.outer` are not modules.
    let Some((_guest, mut host, _bootstrap)) = start("nested.outer.inner.deep") else {
        return;
    };
    let id = host.invoke("[1]");
    assert_eq!(json_of(&host.result(&id).await), json!({"nested": [1]}));
}

#[tokio::test]
async fn a_missing_nested_handler_names_its_module() {
    let Some((_guest, mut host, _bootstrap)) = start("nested.inner.nothere") else {
        return;
    };
    let err = host.init_error().await;
    assert_eq!(
        err,
        json!({
            "errorType": "Runtime.HandlerNotFound",
            "errorMessage": "Handler 'inner.nothere' missing on module 'nested'",
            "requestId": "",
            "stackTrace": [],
        })
    );
}

#[tokio::test]
async fn an_error_while_importing_keeps_only_the_functions_frames() {
    let Some((_guest, mut host, _bootstrap)) = start("broken.handler") else {
        return;
    };
    let err = host.init_error().await;
    assert_eq!(err["errorType"], "KeyError");
    let trace: Vec<&str> = err["stackTrace"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        !trace.iter().any(|l| l.contains("kindling_runtime.py")),
        "{err}"
    );
    assert!(
        trace
            .last()
            .unwrap()
            .contains("broken.py\", line 2, in helper"),
        "{err}"
    );
}
