//! The shipped Node.js runtime (`guest_images/runtimes/node`) behind the real bootstrap.

mod common;

use common::{json_of, start_shipped, Guest, Host, Record};
use serde_json::{json, Value};

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

fn start(handler: &str) -> Option<(Guest, Host, common::Bootstrap)> {
    let task = [
        ("index.js", ASYNC_HANDLER),
        ("cb.js", CALLBACK_HANDLER),
        ("esm.mjs", ESM_HANDLER),
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
    assert!(
        err["stackTrace"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("index.js")),
        "{err}"
    );
    assert!(
        host.logs(Some(&id))
            .contains("[ERROR] TypeError: failing on purpose"),
        "{:#?}",
        host.history
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
    let body = host
        .wait_for("an init error", |r| match r {
            Record::InitError { body, .. } => Some(body.clone()),
            _ => None,
        })
        .await;
    let err: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(err["errorType"], "Runtime.HandlerNotFound");
    let exit = host.exit().await;
    assert_eq!((exit.request_id, exit.exit_code), (None, Some(1)));
}
