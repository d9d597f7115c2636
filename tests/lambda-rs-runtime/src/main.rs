//! A custom runtime (`provided`) built with AWS's own `lambda_runtime` crate, unmodified:
//! proof that a runtime written for Lambda's Runtime API runs on Kindling as it is.
//!
//! It echoes the event with what the crate read from the Runtime API's headers and the
//! reserved environment, so the end-to-end tests can check both reached it.

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

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
