//! AWS's Python runtime interface client, unmodified (issue 10): `awslambdaric` from PyPI,
//! installed by scripts/setup.sh into /opt/kindling-python-ric for the `python` image's
//! Python, runs as a python function's own `bootstrap` (`python3 -m awslambdaric
//! HANDLER`, `tests/functions/python-ric`) in the sandbox. The AWS CLI and boto3 invoke a
//! plain handler (the client's context), a failing one (Lambda's `errorType`,
//! `errorMessage`, `stackTrace`, `FunctionError: Unhandled`) and one whose module fails at
//! import (the client's `/init/error`). Every answer comes through the client's native
//! Runtime API calls, so each assertion fails if it cannot talk to ours.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use crate::node_ric::{answer_through_the_cli, aws_invoke};
use crate::support::{prerequisites, repo_path, FunctionDef, Scratch, Server};

/// Where scripts/setup.sh installs the client and its dependencies.
const RIC_PACKAGES: &str = "/opt/kindling-python-ric";

/// The function's code: its bootstrap and modules, and the client's packages beside them,
/// as a user's deployment package would carry them.
fn ric_code() -> Option<Scratch> {
    if !Path::new(RIC_PACKAGES)
        .join("awslambdaric/__main__.py")
        .is_file()
    {
        println!("SKIPPED: {RIC_PACKAGES} is not installed (scripts/setup.sh installs it)");
        return None;
    }
    let code = Scratch::new();
    let status = Command::new("sh")
        .arg("-c")
        .arg(r#"cp -a "$1"/. "$2"/. "$3""#)
        .arg("sh")
        .arg(repo_path("tests/functions/python-ric"))
        .arg(RIC_PACKAGES)
        .arg(code.path())
        .status()
        .expect("running cp");
    assert!(status.success(), "copying the function's code");
    Some(code)
}

/// `boto3.client("lambda").invoke(...)`: its StatusCode, FunctionError and payload.
fn boto3_invoke(server: &Server, function: &str, payload: &Value) -> Value {
    let script = r#"
import json, sys
import boto3
endpoint, function, payload = sys.argv[1:]
client = boto3.client("lambda", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="x", aws_secret_access_key="x")
r = client.invoke(FunctionName=function, Payload=payload.encode())
print(json.dumps({"StatusCode": r["StatusCode"], "FunctionError": r.get("FunctionError"),
                  "Payload": json.loads(r["Payload"].read())}))
"#;
    let output = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .arg(format!("http://{}", server.addr))
        .arg(function)
        .arg(payload.to_string())
        .output()
        .expect("running /usr/bin/python3");
    assert!(
        output.status.success(),
        "boto3 invoke {function}: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.diagnostics()
    );
    serde_json::from_slice(&output.stdout).expect("the script's JSON")
}

#[tokio::test]
async fn awslambdaric_runs_unmodified_as_the_functions_bootstrap() {
    let Some(bins) = prerequisites(&["/usr/bin/aws", "/usr/bin/python3"]) else {
        return;
    };
    let Some(code) = ric_code() else {
        return;
    };
    let ric = |name: &str, handler: &str| {
        let mut f = FunctionDef::new(name, code.path(), "python", handler);
        f.timeout = 20;
        f
    };
    let server = Server::start(
        bins,
        &[
            ric("pyric", "app.answers"),
            ric("pyric-fails", "app.fails"),
            ric("pyric-broken", "broken.handler"),
        ],
    );
    let out = Scratch::new();

    answer_through_the_cli(
        &server,
        "pyric",
        out.path(),
        ("python", "awslambdaric.lambda_context"),
    );
    let through_boto3 = boto3_invoke(&server, "pyric", &json!({"hello": "boto3"}));
    assert_eq!(through_boto3["StatusCode"], 200, "{through_boto3}");
    assert_eq!(
        through_boto3["FunctionError"],
        Value::Null,
        "{through_boto3}"
    );
    assert_eq!(
        through_boto3["Payload"]["event"],
        json!({"hello": "boto3"}),
        "{through_boto3}"
    );

    for (client, answer, payload) in [
        {
            let (answer, payload) =
                aws_invoke(&server, "pyric-fails", &json!({"card": "4111"}), out.path());
            ("the AWS CLI", answer, payload)
        },
        {
            let r = boto3_invoke(&server, "pyric-fails", &json!({"card": "4111"}));
            ("boto3", r.clone(), r["Payload"].clone())
        },
    ] {
        assert_eq!(answer["StatusCode"], 200, "{client}: {answer}");
        assert_eq!(answer["FunctionError"], "Unhandled", "{client}: {answer}");
        assert_eq!(
            payload["errorType"], "PaymentDeclined",
            "{client}: {payload}"
        );
        assert_eq!(
            payload["errorMessage"], "declined: 4111",
            "{client}: {payload}"
        );
        let trace: Vec<&str> = payload["stackTrace"]
            .as_array()
            .unwrap_or_else(|| panic!("{client}: no stackTrace array: {payload}"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            trace
                .iter()
                .any(|l| l.contains("/var/task/app.py") && l.contains("_charge")),
            "{client}: the trace shows the handler's frames: {payload}"
        );
    }

    // The module raises while it is imported: the client reports it on /init/error.
    let (answer, payload) = aws_invoke(&server, "pyric-broken", &json!({}), out.path());
    assert_eq!(answer["FunctionError"], "Unhandled", "{answer} {payload}");
    assert_eq!(payload["errorType"], "RuntimeError", "{payload}");
    assert!(
        payload["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("no configuration for this stage")),
        "{payload}"
    );
    let through_boto3 = boto3_invoke(&server, "pyric-broken", &json!({}));
    assert_eq!(
        through_boto3["FunctionError"], "Unhandled",
        "{through_boto3}"
    );
    server.stop();
}
