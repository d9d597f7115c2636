//! HTTP triggers beyond function URLs' own events (issue 13): `url_payload = "1.0"` turns a
//! function URL into an API Gateway REST proxy integration (payload format 1.0 events,
//! `multiValueHeaders` answers), and AWS's `lambda_http` crate, unmodified, answers
//! through a function URL in both formats, as do Powertools for AWS Lambda's API Gateway
//! resolvers (`APIGatewayHttpResolver`, `APIGatewayRestResolver`). Requests are made with curl.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::streaming::{curl, header};
use crate::support::{prerequisites, FunctionDef, Scratch, Server};

#[tokio::test]
async fn url_payload_1_0_sends_api_gateway_rest_proxy_events() {
    let Some(bins) = prerequisites(&["/usr/bin/python3", "/usr/bin/curl"]) else {
        return;
    };
    let mut rest = FunctionDef::python_case("rest", "rest_echo");
    rest.url = true;
    rest.url_payload = Some("1.0");
    // No statusCode: API Gateway REST calls that a malformed answer.
    let mut bare = FunctionDef::python_case("rest-bare", "http_bare");
    bare.url = true;
    bare.url_payload = Some("1.0");
    let server = Server::start(bins, &[rest, bare]);
    let url = server.function_url("rest");

    // GET with a query string, cookies and a repeated header.
    let (status, headers, body) = curl(
        &format!("{url}some/path?a=1&a=2&b=x%20y"),
        &[
            "-A",
            "kindling-test",
            "-H",
            "Cookie: c1=v1; c2=v2",
            "-H",
            "X-Multi: one",
            "-H",
            "X-Multi: two",
        ],
    );
    assert_eq!(status, 200, "{}", server.diagnostics());
    assert_eq!(header(&headers, "x-echo"), ["rest"]);
    assert_eq!(
        header(&headers, "set-cookie"),
        ["a=1; Path=/", "b=2; Path=/"]
    );
    let event: Value = serde_json::from_slice(&body).expect("the event as JSON");
    assert!(
        event.get("version").is_none(),
        "REST events have none: {event}"
    );
    assert_eq!(event["resource"], "/{proxy+}");
    assert_eq!(event["path"], "/some/path");
    assert_eq!(event["httpMethod"], "GET");
    assert_eq!(event["headers"]["x-multi"], "two");
    assert_eq!(event["multiValueHeaders"]["x-multi"], json!(["one", "two"]));
    assert_eq!(event["headers"]["cookie"], "c1=v1; c2=v2");
    assert_eq!(event["headers"]["user-agent"], "kindling-test");
    assert_eq!(
        event["queryStringParameters"],
        json!({"a": "2", "b": "x y"})
    );
    assert_eq!(
        event["multiValueQueryStringParameters"],
        json!({"a": ["1", "2"], "b": ["x y"]})
    );
    assert_eq!(event["pathParameters"], json!({"proxy": "some/path"}));
    assert_eq!(event["stageVariables"], Value::Null);
    assert_eq!(event["body"], Value::Null);
    assert_eq!(event["isBase64Encoded"], false);
    let ctx = &event["requestContext"];
    assert_eq!(ctx["httpMethod"], "GET");
    assert_eq!(ctx["path"], "/some/path");
    assert_eq!(ctx["resourcePath"], "/{proxy+}");
    assert_eq!(ctx["stage"], "$default");
    assert_eq!(ctx["protocol"], "HTTP/1.1");
    assert_eq!(ctx["identity"]["sourceIp"], "127.0.0.1");
    assert_eq!(ctx["identity"]["userAgent"], "kindling-test");
    assert_eq!(ctx["identity"]["caller"], Value::Null);
    assert_eq!(ctx["requestId"], header(&headers, "x-amzn-requestid")[0]);
    assert!(
        ctx["accountId"]
            .as_str()
            .is_some_and(|a| a.len() == 12 && a.bytes().all(|b| b.is_ascii_digit())),
        "{ctx}"
    );
    assert!(
        ctx["requestTimeEpoch"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000_000),
        "{ctx}"
    );
    assert!(
        ctx["requestTime"]
            .as_str()
            .is_some_and(|t| t.ends_with(" +0000")),
        "{ctx}"
    );

    // The root: no proxy path, no parameters (null, as API Gateway sends them).
    let (_, _, body) = curl(&url, &[]);
    let event: Value = serde_json::from_slice(&body).expect("the event as JSON");
    assert_eq!(event["path"], "/");
    assert_eq!(event["pathParameters"], Value::Null);
    assert_eq!(event["queryStringParameters"], Value::Null);
    assert_eq!(event["multiValueQueryStringParameters"], Value::Null);

    // POST a binary body: base64 in the event; the status the function picked.
    let scratch = Scratch::new();
    let binary: Vec<u8> = (0..=255u8).chain([0, 0xff]).collect();
    let file = scratch.path().join("body.bin");
    std::fs::write(&file, &binary).expect("writing the body");
    let (status, _, body) = curl(
        &format!("{url}upload?status=201"),
        &[
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", file.display()),
        ],
    );
    assert_eq!(status, 201);
    let event: Value = serde_json::from_slice(&body).expect("the event as JSON");
    assert_eq!(event["httpMethod"], "POST");
    assert_eq!(event["isBase64Encoded"], true);
    let sent = base64::engine::general_purpose::STANDARD
        .decode(event["body"].as_str().expect("a body"))
        .expect("base64");
    assert_eq!(sent, binary);

    // An answer without statusCode is a 502 here, where format 2.0 makes it a 200.
    let (status, _, _) = curl(&server.function_url("rest-bare"), &[]);
    assert_eq!(status, 502);
    server.stop();
}

#[tokio::test]
async fn lambda_http_answers_through_a_function_url_in_both_formats() {
    let Some(bins) = prerequisites(&["/usr/bin/curl"]) else {
        return;
    };
    let code = Scratch::new();
    std::fs::copy(&bins.lambda_rs_bootstrap, code.path().join("bootstrap"))
        .expect("copying the lambda_runtime bootstrap");
    let http = |name: &str, payload: Option<&'static str>| {
        let mut f = FunctionDef::new(name, code.path(), "provided", "unused.handler");
        f.env.push(("KINDLING_TEST_HTTP".into(), "1".into()));
        f.url = true;
        f.url_payload = payload;
        f
    };
    let server = Server::start(bins, &[http("lh", None), http("lh-rest", Some("1.0"))]);
    for (function, format) in [("lh", "2.0"), ("lh-rest", "1.0")] {
        let url = server.function_url(function);
        let (status, headers, body) = curl(
            &format!("{url}items/7?tag=a&tag=b&q=x%20y"),
            &["-H", "Cookie: c1=v1; c2=v2"],
        );
        assert_eq!(status, 200, "{function}: {}", server.diagnostics());
        assert_eq!(header(&headers, "x-lambda-http"), ["yes"], "{function}");
        assert_eq!(
            header(&headers, "set-cookie"),
            ["one=1; Path=/", "two=2; Path=/"],
            "{function}"
        );
        let answer: Value = serde_json::from_slice(&body).expect("lambda_http's JSON");
        assert_eq!(answer["runtime"], "lambda_http", "{answer}");
        assert_eq!(answer["format"], format, "{answer}");
        assert_eq!(answer["method"], "GET");
        assert_eq!(answer["path"], "/items/7", "{answer}");
        assert_eq!(
            answer["query"],
            json!({"tag": ["a", "b"], "q": ["x y"]}),
            "{answer}"
        );
        assert_eq!(answer["cookies"], json!(["c1=v1", "c2=v2"]), "{answer}");

        let (status, _, body) = curl(
            &format!("{url}submit"),
            &[
                "-H",
                "Content-Type: text/plain",
                "--data-binary",
                "hello there",
            ],
        );
        assert_eq!(status, 201, "{function}");
        let answer: Value = serde_json::from_slice(&body).expect("lambda_http's JSON");
        assert_eq!(answer["method"], "POST");
        assert_eq!(answer["path"], "/submit");
        assert_eq!(answer["body"], "hello there", "{answer}");
    }
    server.stop();
}

/// Where scripts/setup.sh puts Powertools for AWS Lambda (Python) and its dependencies, as
/// `pip install --target` lays them out for a function's zip.
const POWERTOOLS: &str = "/opt/kindling-powertools";

#[tokio::test]
async fn powertools_api_gateway_resolvers_answer_through_function_urls() {
    let Some(bins) = prerequisites(&["/usr/bin/python3", "/usr/bin/curl"]) else {
        return;
    };
    let package = std::path::Path::new(POWERTOOLS).join("aws_lambda_powertools");
    if !package.is_dir() {
        println!("SKIPPED: aws-lambda-powertools is not in {POWERTOOLS} (scripts/setup.sh installs it from PyPI)");
        return;
    }
    // The function's code: the app beside its bundled packages, as a Lambda zip holds them.
    let code = Scratch::new();
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{POWERTOOLS}/."))
        .arg(crate::support::repo_path(
            "tests/functions/powertools/app.py",
        ))
        .arg(code.path())
        .status()
        .expect("running cp");
    assert!(copied.success(), "copying Powertools into the code");
    let resolver = |name: &str, handler: &str, payload: Option<&'static str>| {
        let mut f = FunctionDef::new(name, code.path(), "python", handler);
        f.url = true;
        f.url_payload = payload;
        f.timeout = 20;
        f
    };
    let server = Server::start(
        bins,
        &[
            resolver("pt-http", "app.http", None),
            resolver("pt-rest", "app.rest", Some("1.0")),
        ],
    );
    for (function, kind) in [("pt-http", "http"), ("pt-rest", "rest")] {
        let url = server.function_url(function);
        let (status, _, body) = curl(&format!("{url}items/7?q=x%20y"), &["-A", "kindling-test"]);
        assert_eq!(status, 200, "{function}: {}", server.diagnostics());
        let answer: Value = serde_json::from_slice(&body).expect("the resolver's JSON");
        assert_eq!(
            answer,
            json!({"resolver": kind, "item": "7", "q": "x y", "agent": "kindling-test"}),
            "{function}"
        );
        let (status, headers, body) = curl(
            &format!("{url}items"),
            &[
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                r#"{"k":1}"#,
            ],
        );
        assert_eq!(status, 201, "{function}");
        assert_eq!(header(&headers, "content-type"), ["application/json"]);
        let answer: Value = serde_json::from_slice(&body).expect("the resolver's JSON");
        assert_eq!(answer, json!({"resolver": kind, "posted": {"k": 1}}));
        // A route it does not have: the resolver's own 404.
        let (status, _, _) = curl(&format!("{url}nowhere"), &[]);
        assert_eq!(status, 404, "{function}");
    }
    server.stop();
}
