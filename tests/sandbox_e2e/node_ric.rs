//! AWS's Node.js runtime interface client, unmodified (issue 10): `aws-lambda-ric` 4 from
//! npm, built by scripts/setup.sh into /opt/kindling-node-ric with the `node` image's
//! Node.js 22, runs as a function's own `bootstrap` (`tests/functions/node-ric`) in the
//! sandbox. The AWS CLI invokes a plain handler and a failing one (Lambda's
//! `errorType`/`errorMessage`/`trace`, `FunctionError: Unhandled`) and one whose handler
//! is missing (the client's `/init/error`); boto3 reads a `streamifyResponse` handler's
//! chunks as they are written. Every answer comes through the client's own Runtime API
//! calls (its native curl client for `/next`, `/response` and `/error`, Node's HTTP for
//! `/init/error` and streaming), so each assertion fails if it cannot talk to ours.

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::streaming::{chunks_arrive_as_written, python_with_streaming_boto3};
use crate::support::{prerequisites, repo_path, FunctionDef, Scratch, Server};

/// Where scripts/setup.sh installs the client and its dependencies.
const RIC_MODULES: &str = "/opt/kindling-node-ric/node_modules";

/// The function's code: its bootstrap and handlers, and the client as `node_modules`, as a
/// user's deployment package would carry it.
fn ric_code() -> Option<Scratch> {
    let addon = Path::new(RIC_MODULES).join("aws-lambda-ric/rapid-client.node");
    if !addon.is_file() {
        println!(
            "SKIPPED: {} is not built (scripts/setup.sh builds it)",
            addon.display()
        );
        return None;
    }
    let code = Scratch::new();
    let status = Command::new("cp")
        .arg("-a")
        .arg(repo_path("tests/functions/node-ric/app.mjs"))
        .arg(repo_path("tests/functions/node-ric/bootstrap"))
        .arg(RIC_MODULES)
        .arg(code.path())
        .status()
        .expect("running cp");
    assert!(status.success(), "copying the function's code");
    Some(code)
}

/// `aws lambda invoke … --log-type Tail` (Debian's AWS CLI 1, which takes the payload as it
/// is): the CLI's answer (StatusCode, FunctionError, LogResult) and the payload it wrote.
pub(crate) fn aws_invoke(
    server: &Server,
    function: &str,
    payload: &Value,
    dir: &Path,
) -> (Value, Value) {
    let outfile = dir.join(format!("{function}.out"));
    let output = Command::new("aws")
        .args(["lambda", "invoke", "--function-name", function])
        .args(["--log-type", "Tail"])
        .arg("--payload")
        .arg(payload.to_string())
        .arg("--endpoint-url")
        .arg(format!("http://{}", server.addr))
        .arg(&outfile)
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "x")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .output()
        .expect("running aws (scripts/setup.sh installs awscli)");
    assert!(
        output.status.success(),
        "aws lambda invoke {function}: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.diagnostics()
    );
    let answer: Value = serde_json::from_slice(&output.stdout).expect("the CLI's JSON");
    let written = std::fs::read(&outfile).expect("the CLI's outfile");
    let payload = serde_json::from_slice(&written).unwrap_or_else(|_| {
        panic!(
            "{function} answered {:?}",
            String::from_utf8_lossy(&written)
        )
    });
    (answer, payload)
}

/// The log tail the CLI got.
pub(crate) fn log_tail(answer: &Value) -> String {
    let log = base64::engine::general_purpose::STANDARD
        .decode(answer["LogResult"].as_str().expect("LogResult"))
        .expect("base64 log");
    String::from_utf8_lossy(&log).into_owned()
}

/// Invokes `function` (a runtime interface client's `answers` handler) through the AWS
/// CLI with `{"hello": "ric"}` and checks the answer: its log tail's START line, and the
/// context the handler echoed, `language` naming the key of the language's version and
/// the client's own name for its context. Returns the handler's payload.
pub(crate) fn answer_through_the_cli(
    server: &Server,
    function: &str,
    out: &Path,
    (language, runtime): (&str, &str),
) -> Value {
    let (answer, payload) = aws_invoke(server, function, &json!({"hello": "ric"}), out);
    assert_eq!(answer["StatusCode"], 200, "{answer}");
    assert!(answer.get("FunctionError").is_none(), "{answer} {payload}");
    let request_id = payload["requestId"].as_str().unwrap_or("");
    assert!(
        log_tail(&answer).contains(&format!("START RequestId: {request_id} ")),
        "{payload} {}",
        log_tail(&answer)
    );
    assert_eq!(
        payload,
        json!({
            "event": {"hello": "ric"},
            "requestId": request_id,
            "functionName": function,
            "arn": payload["arn"],
            "remainingOk": true,
            language: payload[language],
            "runtime": runtime,
        })
    );
    assert!(
        payload["arn"]
            .as_str()
            .unwrap_or("")
            .ends_with(&format!(":function:{function}")),
        "{payload}"
    );
    payload
}

#[tokio::test]
async fn aws_lambda_ric_runs_unmodified_as_the_functions_bootstrap() {
    let Some(bins) = prerequisites(&["/usr/bin/aws"]) else {
        return;
    };
    let Some(python) = python_with_streaming_boto3() else {
        return;
    };
    let Some(code) = ric_code() else {
        return;
    };
    let ric = |name: &str, handler: &str| {
        let mut f = FunctionDef::new(name, code.path(), "node", &format!("app.{handler}"));
        f.timeout = 20;
        f.memory = 256;
        f
    };
    let server = Server::start(
        bins,
        &[
            ric("ric", "answers"),
            ric("ric-fails", "fails"),
            ric("ric-missing", "missing"),
            ric("ric-stream", "streams"),
        ],
    );
    let out = Scratch::new();

    let payload = answer_through_the_cli(&server, "ric", out.path(), ("node", "aws-lambda-ric"));
    assert!(
        payload["node"].as_str().unwrap_or("").starts_with("22."),
        "{payload}"
    );

    let (answer, payload) = aws_invoke(&server, "ric-fails", &json!({"card": "4111"}), out.path());
    assert_eq!(answer["StatusCode"], 200, "{answer}");
    assert_eq!(answer["FunctionError"], "Unhandled", "{answer} {payload}");
    assert_eq!(payload["errorType"], "PaymentDeclined", "{payload}");
    assert_eq!(payload["errorMessage"], "declined: 4111", "{payload}");
    let trace: Vec<&str> = payload["trace"]
        .as_array()
        .unwrap_or_else(|| panic!("no trace array: {payload}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        trace.first(),
        Some(&"PaymentDeclined: declined: 4111"),
        "{payload}"
    );
    assert!(
        trace.iter().any(|l| l.contains("/var/task/app.mjs")),
        "{payload}"
    );

    // No such export: the client reports it on /init/error, and the caller gets it.
    let (answer, payload) = aws_invoke(&server, "ric-missing", &json!({}), out.path());
    assert_eq!(answer["FunctionError"], "Unhandled", "{answer} {payload}");
    assert_eq!(payload["errorType"], "Runtime.HandlerNotFound", "{payload}");

    chunks_arrive_as_written(&python, &server, "ric-stream");
    server.stop();
}
