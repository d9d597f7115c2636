//! The server's own life: a bad functions file stops it at start with the file, line and
//! key named; SIGTERM lets the invocation in flight finish and leaves nothing behind; an
//! idle environment is frozen, so background work stops between invocations.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kindling_runtime_api::client::{self, InvokeOptions};
use serde_json::json;

use crate::support::{eventually, json, prerequisites, repo_path, FunctionDef, Scratch, Server};

/// Runs `kindling serve` on `addr` and `functions` until it exits (it is expected to refuse).
fn serve_to_the_end(addr: &str, functions: &Path, state: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kindling"))
        .args(["serve", "--addr", addr, "--functions"])
        .arg(functions)
        .arg("--state-dir")
        .arg(state)
        .output()
        .expect("running kindling serve")
}

#[test]
fn a_bad_functions_file_names_file_line_and_key() {
    // Needs neither root nor guest binaries: the file is read before anything starts.
    let dir = Scratch::new();
    let code = repo_path("tests/functions/python-cases");
    let head = format!(
        "# a comment\n[functions.bad]\ncode = {:?}\nruntime = \"python\"\nhandler = \"cases.echo\"\n",
        code.display()
    );
    let cases = [
        ("memroy = 128\n", "memroy"),
        (
            "timeout = 0\n",
            "functions.bad.timeout: 0 is out of range 1..900",
        ),
        ("isolation = \"docker\"\n", "functions.bad.isolation"),
        // A wrong type: the line (which holds the key) and the type are named.
        (
            "max_concurrency = \"four\"\n",
            "invalid type: string \"four\"",
        ),
    ];
    for (line, key) in cases {
        let file = dir.path().join("functions.toml");
        std::fs::write(&file, format!("{head}{line}")).unwrap();
        let state = dir.path().join("state");
        let started = Instant::now();
        let out = serve_to_the_end("127.0.0.1:0", &file, &state);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{line:?} was accepted");
        assert!(started.elapsed() < Duration::from_secs(10));
        let want = format!("kindling: {}:6: ", file.display());
        assert!(stderr.starts_with(&want), "{line:?}: {stderr}");
        assert!(stderr.contains(key), "{line:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(!state.exists(), "nothing is made for a bad file");
    }
}

#[test]
fn an_address_other_hosts_reach_needs_allow_remote() {
    let dir = Scratch::new();
    let file = dir.path().join("functions.toml");
    let code = repo_path("tests/functions/python-cases");
    std::fs::write(
        &file,
        format!(
            "[functions.f]\ncode = {:?}\nruntime = \"python\"\nhandler = \"cases.echo\"\n",
            code.display()
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let out = serve_to_the_end("0.0.0.0:0", &file, &state);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "0.0.0.0 was served: {stderr}");
    assert!(
        stderr.contains("no authentication") && stderr.contains("--allow-remote"),
        "{stderr}"
    );
    assert!(!state.exists(), "nothing is made for a refused address");
}

/// The sandbox helper dies with the server by the parent-death signal it sets itself (the
/// server spawns it without a fork of its own), and init, and so every process of the
/// environment, dies with the helper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_server_takes_its_environments_along() {
    let Some(bins) = prerequisites(&["/usr/bin/python3"]) else {
        return;
    };
    let server = Server::start(bins, &[FunctionDef::python_case("echo", "echo")]);
    let answer = server.invoke("echo", &json!({"id": 1})).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    let started = server.kill();
    // Names as the kernel keeps them: at most 15 bytes.
    for expected in [
        "kindling-sandbox-exec",
        "init",
        "kindling-bootstrap",
        "python3",
    ] {
        assert!(
            started.iter().any(|p| expected.starts_with(&p.comm)),
            "{expected} was not running: {started:?}"
        );
    }
    eventually("the environment's processes are gone", || {
        started.iter().all(|p| !p.is_alive())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_invocation_in_flight_and_leaves_nothing() {
    let Some(bins) = prerequisites(&["/usr/bin/python3", "/bin/bash", "/usr/bin/curl"]) else {
        return;
    };
    let server = Server::start(
        bins,
        &[
            FunctionDef::python_case("echo", "echo"),
            FunctionDef::python_case("sleeps", "sleeps"),
            FunctionDef::new(
                "tutorial",
                repo_path("examples/hello-bash"),
                "provided-debian",
                "function.handler",
            ),
        ],
    );
    for function in ["echo", "tutorial"] {
        let answer = server.invoke(function, &json!({"id": 1})).await;
        assert_eq!(answer.status, 200, "{}", server.diagnostics());
    }
    let addr = server.addr;
    let in_flight = tokio::spawn(async move {
        client::invoke(
            addr,
            "sleeps",
            json!({"seconds": 1}).to_string(),
            &InvokeOptions::default(),
        )
        .await
    });
    eventually("the invocation of sleeps starts", || {
        server.log("sleeps").contains("START RequestId")
    })
    .await;
    assert_eq!(server.env_dirs().len(), 3);

    let started = tokio::task::spawn_blocking(move || server.stop())
        .await
        .expect("stopping the server");
    // Two sandbox helper processes per environment were running (the helper and the
    // keeper of its user namespace): stop() checked they are gone.
    let helpers = started
        .iter()
        .filter(|p| "kindling-sandbox-exec".starts_with(&p.comm))
        .count();
    assert_eq!(helpers, 6, "{started:?}");

    let answer = in_flight
        .await
        .unwrap()
        .expect("an answer before the server stopped");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.function_error, None);
    assert_eq!(json(&answer)["slept"], 1);
}

/// Between invocations a sandbox is frozen (cgroup v2 freezer), as Lambda freezes its
/// environments: the background process a handler started stamps the time every 20 ms
/// while invocations run, and not at all for the 1.5 s between two of them; the frozen
/// sandbox still stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_work_stops_between_invocations() {
    let Some(bins) = prerequisites(&["/usr/bin/python3"]) else {
        return;
    };
    let server = Server::start(bins, &[FunctionDef::probe()]);
    let stamp = json!({"action": "stamp", "seconds": 0.5});
    let first = json(&server.invoke("probe", &stamp).await)["stamp"].clone();
    let during = |s: &serde_json::Value| s["during"].as_u64().unwrap_or_default();
    let gap = |s: &serde_json::Value| s["largest_gap"].as_f64().unwrap_or_default();
    assert!(during(&first) >= 10 && gap(&first) < 0.5, "{first}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = json(&server.invoke("probe", &stamp).await)["stamp"].clone();
    assert!(
        gap(&second) >= 1.0,
        "no pause between invocations: {second}"
    );
    assert!(during(&second) >= 10, "no stamps once thawed: {second}");
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .expect("stopping the server");
}
