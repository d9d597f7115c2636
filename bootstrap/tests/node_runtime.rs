//! The shipped Node.js runtime (`guest_images/runtimes/node`) behind the real bootstrap.

mod common;

use common::{json_of, start_shipped, Guest, Host, Record};
use serde_json::json;

const ASYNC_HANDLER: &str = r#"
let calls = 0;
exports.handler = async (event, context) => {
  calls += 1;
  console.log('event', JSON.stringify(event));
  if (event.fail) throw new TypeError(`failing on ${event.fail}`);
  await new Promise((r) => setTimeout(r, 5));
  return {
    event,
    calls,
    awsRequestId: context.awsRequestId,
    functionName: context.functionName,
    functionVersion: context.functionVersion,
    memoryLimitInMB: context.memoryLimitInMB,
    invokedFunctionArn: context.invokedFunctionArn,
    logGroupName: context.logGroupName,
    logStreamName: context.logStreamName,
    remainingMs: context.getRemainingTimeInMillis(),
    traceId: process.env._X_AMZN_TRACE_ID,
    greeting: process.env.GREETING,
  };
};
"#;

const CALLBACK_HANDLER: &str = r#"
exports.handler = function (event, context, callback) {
  console.error('callback style');
  setTimeout(() => {
    if (event.fail) callback(new Error('callback failure'));
    else callback(null, { doubled: event.n * 2, id: context.awsRequestId });
  }, 5);
};
"#;

const ESM_HANDLER: &str = r#"
export const handler = async (event) => ({ esm: true, event });
"#;

/// The handlers of the sandbox end-to-end tests, each exercising one trait of Lambda's
/// runtime.
const LAMBDA_HANDLERS: &str = include_str!("../../tests/functions/node-cases/cases.js");

fn start(handler: &str) -> Option<(Guest, Host, common::Bootstrap)> {
    let task = [
        ("index.js", ASYNC_HANDLER),
        ("cb.js", CALLBACK_HANDLER),
        ("esm.mjs", ESM_HANDLER),
        ("cases.js", LAMBDA_HANDLERS),
    ];
    start_shipped("node", "node", &task, handler)
}

#[tokio::test]
async fn async_handler_returns_with_a_lambda_context() {
    let Some((_guest, mut host, _bootstrap)) = start("index.handler") else {
        return;
    };
    let id = host.invoke(r#"{"name":"kindling"}"#);
    let record = host.result(&id).await;
    assert!(matches!(record, Record::Response { .. }), "{record:?}");
    let out = json_of(&record);
    assert_eq!(out["event"], json!({"name": "kindling"}));
    assert_eq!(out["awsRequestId"], json!(id));
    assert_eq!(out["functionName"], "test-fn");
    assert_eq!(out["functionVersion"], "$LATEST");
    assert_eq!(out["memoryLimitInMB"], "256");
    assert_eq!(
        out["invokedFunctionArn"],
        "arn:aws:lambda:eu-west-1:000000000000:function:test-fn"
    );
    assert_eq!(out["logGroupName"], "/aws/lambda/test-fn");
    assert_eq!(out["logStreamName"], "2026/11/27/[$LATEST]abc");
    let remaining = out["remainingMs"].as_i64().unwrap();
    assert!(remaining > 20_000 && remaining <= 30_000, "{out}");
    assert!(
        out["traceId"]
            .as_str()
            .unwrap()
            .starts_with("Root=1-5bef4de7-"),
        "{out}"
    );
    assert_eq!(out["greeting"], "hi");
    assert!(
        host.logs(Some(&id))
            .contains("event {\"name\":\"kindling\"}\n"),
        "{:#?}",
        host.history
    );

    let next = host.invoke("{}");
    assert_eq!(json_of(&host.result(&next).await)["calls"], 2);
}

#[tokio::test]
async fn async_handler_that_throws_posts_a_lambda_error() {
    let Some((_guest, mut host, _bootstrap)) = start("index.handler") else {
        return;
    };
    let id = host.invoke(r#"{"fail":"purpose"}"#);
    let record = host.result(&id).await;
    assert!(matches!(record, Record::Error { .. }), "{record:?}");
    let err = json_of(&record);
    assert_eq!(err["errorType"], "TypeError");
    assert_eq!(err["errorMessage"], "failing on purpose");
    // Lambda's Node.js runtime names the stack `trace`, its first line included.
    assert_eq!(err.get("stackTrace"), None, "{err}");
    let trace = err["trace"].as_array().unwrap();
    assert_eq!(trace[0], "TypeError: failing on purpose", "{err}");
    assert!(
        trace
            .iter()
            .any(|l| l.as_str().unwrap().contains("index.js")),
        "{err}"
    );
    let logs = host.logs(Some(&id));
    assert!(
        logs.contains(&format!(
            "\t{id}\tERROR\tInvoke Error \t{{\"errorType\":\"TypeError\",\"errorMessage\":\"failing on purpose\""
        )),
        "{logs}"
    );
}

#[tokio::test]
async fn callback_handler_succeeds_and_fails() {
    let Some((_guest, mut host, _bootstrap)) = start("cb.handler") else {
        return;
    };
    let id = host.invoke(r#"{"n":21}"#);
    let record = host.result(&id).await;
    assert_eq!(json_of(&record), json!({"doubled": 42, "id": id}));
    assert!(host.logs(Some(&id)).contains("callback style\n"));

    let id = host.invoke(r#"{"fail":true}"#);
    let record = host.result(&id).await;
    assert!(matches!(record, Record::Error { .. }), "{record:?}");
    assert_eq!(json_of(&record)["errorMessage"], "callback failure");
}

#[tokio::test]
async fn es_module_handler() {
    let Some((_guest, mut host, _bootstrap)) = start("esm.handler") else {
        return;
    };
    let id = host.invoke("[1,2]");
    assert_eq!(
        json_of(&host.result(&id).await),
        json!({"esm": true, "event": [1, 2]})
    );
}

#[tokio::test]
async fn missing_handler_is_an_init_error() {
    let Some((_guest, mut host, _bootstrap)) = start("index.nothere") else {
        return;
    };
    let err = host.init_error().await;
    assert_eq!(err["errorType"], "Runtime.HandlerNotFound");
    let exit = host.exit().await;
    assert_eq!((exit.request_id, exit.exit_code), (None, Some(1)));
}

#[tokio::test]
async fn console_lines_carry_lambdas_prefix() {
    let Some((_guest, mut host, _bootstrap)) = start("cases.logs") else {
        return;
    };
    let id = host.invoke("{}");
    assert_eq!(json_of(&host.result(&id).await), "logged");
    let logs = host.logs(Some(&id));
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines.len(), 6, "{logs}");
    for (line, (level, message)) in lines.iter().zip([
        ("INFO", "via log 1"),
        ("INFO", "via info"),
        ("WARN", "via warn"),
        ("ERROR", "via error"),
        ("DEBUG", "via debug"),
        ("TRACE", "via trace"),
    ]) {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields[1..], [id.as_str(), level, message], "{line}");
        // 2026-12-02T05:16:40.123Z
        let time = fields[0].as_bytes();
        assert!(
            time.len() == 24 && time[10] == b'T' && time[19] == b'.' && time[23] == b'Z',
            "{line}"
        );
    }
}

#[tokio::test]
async fn a_callback_waits_for_the_empty_event_loop_unless_told_not_to() {
    let Some((_guest, mut host, _bootstrap)) = start("cases.late") else {
        return;
    };
    // Waiting (the default): the answer comes once the timer has fired.
    let begun = std::time::Instant::now();
    let id = host.invoke(r#"{"ms": 700}"#);
    assert_eq!(json_of(&host.result(&id).await), json!({"waits": true}));
    assert!(begun.elapsed() >= std::time::Duration::from_millis(700));
    assert!(
        host.logs(Some(&id)).contains("timer fired"),
        "{:#?}",
        host.history
    );

    // Not waiting: the answer comes at once, the timer fires after it.
    let begun = std::time::Instant::now();
    let id = host.invoke(r#"{"ms": 1500, "noWait": true}"#);
    assert_eq!(json_of(&host.result(&id).await), json!({"waits": false}));
    assert!(
        begun.elapsed() < std::time::Duration::from_millis(1500),
        "{:?}",
        begun.elapsed()
    );
    assert!(!host.logs(Some(&id)).contains("timer fired"));
}

#[tokio::test]
async fn nested_handlers_are_found_through_properties() {
    let Some((_guest, mut host, _bootstrap)) = start("cases.nested.deeper.handler") else {
        return;
    };
    let id = host.invoke("[3]");
    assert_eq!(json_of(&host.result(&id).await), json!({"nested": [3]}));
}

#[tokio::test]
async fn a_streaming_handler_posts_a_streamed_response() {
    let Some((_guest, mut host, _bootstrap)) = start("cases.streams") else {
        return;
    };
    let id = host.invoke(r#"{"n": 3}"#);
    let Record::Response { body, headers, .. } = host.result(&id).await else {
        panic!("{:#?}", host.history)
    };
    assert_eq!(
        headers["content-type"],
        "application/vnd.awslambda.http-integration-response"
    );
    assert_eq!(
        headers["lambda-runtime-function-response-mode"],
        "streaming"
    );
    let mut want = br#"{"statusCode":201}"#.to_vec();
    want.extend([0u8; 8]);
    want.extend(b"streamed 3");
    assert_eq!(&body[..], &want[..]);
}
