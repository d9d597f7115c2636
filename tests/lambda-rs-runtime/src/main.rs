//! A custom runtime (`provided`) built with AWS's own `lambda_runtime` crate, unmodified:
//! proof that a runtime written for Lambda's Runtime API runs on Kindling as it is.
//!
//! By default it echoes the event with what the crate read from the Runtime API's headers
//! and the reserved environment, so the end-to-end tests can check both reached it. With
//! `KINDLING_TEST_STREAM=1` in its environment it streams its response instead
//! (`lambda_runtime::streaming`): `first\n`, a pause of the event's `pause_ms` (1000 by
//! default), then `second\n`, or, when the event has `"fail": true`, an error in
//! mid-stream; an event with `"bytes": N` streams N bytes in 64 KiB chunks instead.
//!
//! With `KINDLING_TEST_NOOP=1` it does nothing and answers `null`: `kindling bench`'s
//! `provided` no-op function, which measures the platform, not the handler.
//!
//! With `KINDLING_TEST_HTTP=1` it is an HTTP function written with AWS's `lambda_http`
//! crate (for function URLs and API Gateway): it answers with what the crate read of the
//! request (method, path, query parameters, cookies, body, which event format it saw),
//! status 201 for a POST, a header and two cookies of its own.

use std::time::Duration;

use lambda_runtime::streaming::{channel, Body, Response};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::{json, Value};

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    let (payload, context) = event.into_parts();
    Ok(json!({
        "runtime": "lambda_runtime",
        "event": payload,
        "request_id": context.request_id,
        "function_arn": context.invoked_function_arn,
        "function_name": context.env_config.function_name,
        "memory_mb": context.env_config.memory,
    }))
}

async fn noop(_: LambdaEvent<Value>) -> Result<Value, Error> {
    Ok(Value::Null)
}

async fn streaming(event: LambdaEvent<Value>) -> Result<Response<Body>, Error> {
    let event = event.payload;
    let (mut tx, rx) = channel();
    tokio::spawn(async move {
        if let Some(total) = event["bytes"].as_u64() {
            let chunk = bytes::Bytes::from(vec![b'x'; 64 << 10]);
            let mut sent = 0u64;
            while sent < total {
                let n = (total - sent).min(chunk.len() as u64);
                let part = chunk.slice(..usize::try_from(n).unwrap_or(chunk.len()));
                if tx.send_data(part).await.is_err() {
                    return;
                }
                sent += n;
            }
            return;
        }
        let pause = Duration::from_millis(event["pause_ms"].as_u64().unwrap_or(1000));
        if tx.send_data("first\n".into()).await.is_err() {
            return;
        }
        tokio::time::sleep(pause).await;
        if event["fail"].as_bool() == Some(true) {
            tx.send_error(lambda_runtime_api_client::Error::new(
                "deliberate failure in mid-stream",
            ));
            return;
        }
        let _ = tx.send_data("second\n".into()).await;
    });
    Ok(Response::from(rx))
}

async fn http(req: lambda_http::Request) -> Result<lambda_http::Response<String>, Error> {
    use lambda_http::request::RequestContext;
    use lambda_http::RequestExt;
    let query = req.query_string_parameters();
    let params: serde_json::Map<String, Value> = query
        .iter()
        .map(|(k, _)| (k.to_string(), json!(query.all(k).unwrap_or_default())))
        .collect();
    let cookies: Vec<String> = req
        .headers()
        .get_all(lambda_http::http::header::COOKIE)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or_default().split(';'))
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    let format = match req.request_context_ref() {
        Some(RequestContext::ApiGatewayV1(_)) => "1.0",
        Some(RequestContext::ApiGatewayV2(_)) => "2.0",
        _ => "other",
    };
    let body = req.body();
    let answer = json!({
        "runtime": "lambda_http",
        "format": format,
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": params,
        "cookies": cookies,
        "body": String::from_utf8_lossy(body.as_ref()),
        "body_bytes": body.len(),
    });
    let status = match *req.method() {
        lambda_http::http::Method::POST => 201,
        _ => 200,
    };
    Ok(lambda_http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-lambda-http", "yes")
        .header("set-cookie", "one=1; Path=/")
        .header("set-cookie", "two=2; Path=/")
        .body(answer.to_string())?)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    if std::env::var_os("KINDLING_TEST_STREAM").is_some() {
        lambda_runtime::run(service_fn(streaming)).await
    } else if std::env::var_os("KINDLING_TEST_NOOP").is_some() {
        lambda_runtime::run(service_fn(noop)).await
    } else if std::env::var_os("KINDLING_TEST_HTTP").is_some() {
        lambda_http::run(lambda_http::service_fn(http)).await
    } else {
        lambda_runtime::run(service_fn(handler)).await
    }
}
