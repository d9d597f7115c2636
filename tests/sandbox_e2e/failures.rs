//! A function that fails fails one invocation, with Lambda's error answer, and the next
//! invocation works: a raised exception, a process exit, a timeout, an oversized response.
//! The `REPORT` of an invocation the environment failed says how (`Status: timeout`,
//! `Status: error` with its `Error Type`) and how much memory it used.

use std::time::{Duration, Instant};

use kindling_runtime_api::client::{InvokeOptions, InvokeResponse};
use serde_json::{json, Value};

use crate::support::{json, prerequisites, FunctionDef, Server};

const PYTHON: &[&str] = &["/usr/bin/python3"];

/// The checks every unhandled function error shares; returns the error JSON.
fn unhandled(answer: &InvokeResponse, error_type: &str) -> Value {
    assert_eq!(answer.status, 200);
    assert_eq!(answer.function_error.as_deref(), Some("Unhandled"));
    let body = json(answer);
    assert_eq!(body["errorType"], error_type, "{body}");
    body
}

/// With the log tail, to see whether the invocation had a cold start.
fn with_tail() -> InvokeOptions {
    InvokeOptions {
        log_tail: true,
        ..InvokeOptions::default()
    }
}

/// The `REPORT` line of an invocation's log tail, and its `Max Memory Used` in MB.
fn report_of(answer: &InvokeResponse) -> (String, u64) {
    let tail = answer.log_tail.as_deref().expect("a log tail");
    let report = tail
        .lines()
        .find(|l| l.starts_with("REPORT RequestId: "))
        .unwrap_or_else(|| panic!("no REPORT in the tail: {tail}"));
    let used = report
        .split('\t')
        .find_map(|field| field.strip_prefix("Max Memory Used: "))
        .and_then(|mb| mb.strip_suffix(" MB")?.parse().ok())
        .unwrap_or_else(|| panic!("no Max Memory Used: {report}"));
    println!("{report}");
    (report.to_string(), used)
}

#[tokio::test]
async fn a_raised_exception_is_an_unhandled_error_with_its_stack() {
    let Some(bins) = prerequisites(PYTHON) else {
        return;
    };
    let server = Server::start(bins, &[FunctionDef::python_case("raises", "raises")]);
    let answer = server
        .invoke_with("raises", &json!({"why": "no cheese"}), &with_tail())
        .await;
    let body = unhandled(&answer, "ValueError");
    // The function's own error: its REPORT has no Status, as Lambda's has none.
    let (report, _) = report_of(&answer);
    assert!(!report.contains("Status: "), "{report}");
    assert_eq!(body["errorMessage"], "bad input: no cheese");
    let stack = body["stackTrace"].as_array().expect("stackTrace is a list");
    assert!(
        stack
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains("cases.py"))),
        "{stack:?}"
    );
    // The same environment goes on serving.
    let again = server.invoke("raises", &json!({})).await;
    assert_eq!(json(&again)["errorMessage"], "bad input: none given");
    assert_eq!(server.env_dirs().len(), 1);
    server.stop();
}

#[tokio::test]
async fn a_process_exit_fails_only_its_invocation() {
    let Some(bins) = prerequisites(PYTHON) else {
        return;
    };
    let server = Server::start(bins, &[FunctionDef::python_case("exits", "exits")]);
    let answer = server.invoke_with("exits", &json!({}), &with_tail()).await;
    let body = unhandled(&answer, "Runtime.ExitError");
    let message = body["errorMessage"].as_str().expect("errorMessage");
    assert!(message.contains("Runtime exited with error"), "{message}");
    assert!(message.contains('3'), "the exit status is named: {message}");
    let (report, used) = report_of(&answer);
    assert!(
        report.ends_with("\tStatus: error\tError Type: Runtime.ExitError"),
        "{report}"
    );
    // A Python interpreter that ran its handler: some MB, measured though it died.
    assert!(used >= 5, "{report}");

    let next = server.invoke("exits", &json!({"exit": false})).await;
    assert_eq!(next.status, 200, "{}", server.diagnostics());
    assert_eq!(next.function_error, None);
    assert_eq!(json(&next)["survived"], true);
    server.stop();
}

#[tokio::test]
async fn a_timeout_answers_task_timed_out_and_the_next_runs_fresh() {
    let Some(bins) = prerequisites(PYTHON) else {
        return;
    };
    let mut sleeps = FunctionDef::python_case("sleeps", "sleeps");
    sleeps.timeout = 1;
    let server = Server::start(bins, &[sleeps]);
    let warm = server
        .invoke_with("sleeps", &json!({"seconds": 0}), &with_tail())
        .await;
    assert_eq!(warm.status, 200, "{}", server.diagnostics());
    let first_env = json(&warm)["stream"].clone();

    // Holding 60 MiB when its time runs out: the REPORT counts them.
    let started = Instant::now();
    let answer = server
        .invoke_with("sleeps", &json!({"hold_mib": 60}), &with_tail())
        .await;
    let took = started.elapsed();
    let body = unhandled(&answer, "Sandbox.Timedout");
    let (report, used) = report_of(&answer);
    assert!(report.ends_with("\tStatus: timeout"), "{report}");
    assert!((60..=128).contains(&used), "{report}");
    let message = body["errorMessage"].as_str().expect("errorMessage");
    assert!(
        message.contains("Task timed out after 1.00 seconds"),
        "{message}"
    );
    assert!(
        (Duration::from_secs(1)..Duration::from_secs(5)).contains(&took),
        "answered after {took:?}"
    );
    assert!(server
        .log("sleeps")
        .contains("Task timed out after 1.00 seconds"));

    let next = server
        .invoke_with("sleeps", &json!({"seconds": 0}), &with_tail())
        .await;
    assert_eq!(next.status, 200, "{}", server.diagnostics());
    assert_eq!(next.function_error, None);
    let tail = next.log_tail.as_deref().expect("a log tail");
    assert!(tail.contains("Init Duration: "), "a cold start: {tail}");
    assert_ne!(json(&next)["stream"], first_env, "a fresh environment");
    server.stop();
}

#[tokio::test]
async fn a_7_mib_response_is_too_large_and_loses_nothing_after() {
    let Some(bins) = prerequisites(PYTHON) else {
        return;
    };
    let server = Server::start(bins, &[FunctionDef::python_case("big", "big")]);
    let answer = server.invoke("big", &json!({"mib": 7})).await;
    let body = unhandled(&answer, "Function.ResponseSizeTooLarge");
    assert!(body["errorMessage"].is_string(), "{body}");
    assert!(
        answer.body.len() < 4096,
        "the 7 MiB did not reach the caller"
    );

    let next = server.invoke("big", &json!({"mib": 1})).await;
    assert_eq!(next.status, 200, "{}", server.diagnostics());
    assert_eq!(next.function_error, None);
    // A JSON string: 1 MiB of x between quotes.
    assert_eq!(next.body.len(), (1 << 20) + 2);
    server.stop();
}

#[tokio::test]
async fn running_out_of_memory_is_runtime_out_of_memory() {
    let Some(bins) = prerequisites(PYTHON) else {
        return;
    };
    let server = Server::start(bins, &[FunctionDef::python_case("hog", "hog")]);
    let answer = server.invoke_with("hog", &json!({}), &with_tail()).await;
    let body = unhandled(&answer, "Runtime.OutOfMemory");
    let message = body["errorMessage"].as_str().expect("errorMessage");
    assert!(message.contains("signal: killed"), "{message}");
    let (report, used) = report_of(&answer);
    assert!(
        report.ends_with("\tStatus: error\tError Type: Runtime.OutOfMemory"),
        "{report}"
    );
    // It reached its 128 MB before the kernel killed it.
    assert!((100..=128).contains(&used), "{report}");
    // Within its memory, the next invocation works.
    let next = server.invoke("hog", &json!({"mib": 8})).await;
    assert_eq!(json(&next)["held"], 8 << 20, "{}", server.diagnostics());
    server.stop();
}
