//! Lambda's Extensions, Telemetry and Logs APIs (issue 13) with a real external extension
//! in a layer (`tests/functions/extensions/layer/extensions/probe-ext`, a Python script
//! written as AWS's samples are), through `kindling serve` and the sandbox: it registers,
//! is refused with a wrong or missing identifier, gets `INVOKE` with the request id,
//! receives platform and function telemetry on `sandbox.localdomain`, holds the next
//! invocation (not the caller's answer) while it works, and gets `SHUTDOWN` when the idle
//! environment is retired. A hostile extension (never done, or flooding output past a
//! slow listener) neither hangs the host nor grows the agent. `AWS_LAMBDA_EXEC_WRAPPER`
//! wraps the Python runtime.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::support::{
    descendants, eventually, json, prerequisites, repo_path, request_id, FunctionDef, Server,
};

/// The extensions' function, with the extension's layer and `EXT_MODE=mode`.
fn with_extension(name: &str, mode: &str) -> FunctionDef {
    let mut f = FunctionDef::new(
        name,
        repo_path("tests/functions/extensions"),
        "python",
        "app.handler",
    );
    f.layers = vec![repo_path("tests/functions/extensions/layer")];
    f.env = vec![("EXT_MODE".into(), mode.into())];
    // One environment: the second invocation must wait for the first one's extension.
    f.max_concurrency = 1;
    f
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test]
async fn an_extension_registers_sees_invokes_telemetry_and_shutdown_and_delays_the_next_event() {
    let Some(bins) = prerequisites(&["/usr/bin/python3"]) else {
        return;
    };
    let server = Server::start_with(
        bins,
        &[with_extension("ext", "good")],
        &["--idle-timeout", "4"],
        &[],
    );
    let first = server.invoke("ext", &json!({})).await;
    let answered = now();
    assert_eq!(first.status, 200, "{}", server.diagnostics());
    let id1 = request_id(&first);
    // The caller's answer is not held by the extension's one-second sleep...
    let ran = json(&first)["at"].as_f64().unwrap();
    assert!(
        answered - ran < 0.5,
        "answer came {:.3} s after the handler returned",
        answered - ran
    );
    // ...but the environment takes the next event only once the extension is done.
    let second = server.invoke("ext", &json!({})).await;
    assert_eq!(second.status, 200, "{}", server.diagnostics());
    let id2 = request_id(&second);
    let ran2 = json(&second)["at"].as_f64().unwrap();
    assert!(
        ran2 - answered > 0.8,
        "the second invocation ran {:.3} s after the first answer",
        ran2 - answered
    );

    let log = || server.log("ext");
    eventually("the extension's lines of both invocations", || {
        log().contains(&format!("probe-ext done {id2}"))
            && log().contains(&format!("probe-ext telemetry platform.report {id1}"))
    })
    .await;
    let text = log();
    for line in [
        "EXTENSION\tName: probe-ext\tState: Ready\tEvents: [INVOKE, SHUTDOWN]".to_string(),
        "probe-ext registered 200 ext $LATEST app.handler 000000000000".into(),
        "probe-ext refused 403 Extension.InvalidExtensionIdentifier 403 Extension.MissingExtensionIdentifier".into(),
        "probe-ext subscribed 200 OK".into(),
        "probe-ext telemetry platform.initStart".into(),
        "probe-ext telemetry platform.initRuntimeDone".into(),
        format!("probe-ext INVOKE {id1} arn:aws:lambda:"),
        format!("probe-ext telemetry platform.start {id1}"),
        format!("probe-ext telemetry function function line of {id1}"),
        format!("probe-ext telemetry platform.runtimeDone {id1}"),
        format!("probe-ext done {id1}"),
        format!("probe-ext INVOKE {id2}"),
    ] {
        assert!(text.contains(&line), "no {line:?} in the log:\n{text}");
    }
    // platform.report covers the extension's second; REPORT is the runtime's alone.
    let report_ms: f64 = text
        .lines()
        .find_map(|l| {
            l.split(&format!("probe-ext telemetry platform.report {id1} "))
                .nth(1)
        })
        .and_then(|ms| ms.trim().parse().ok())
        .expect("platform.report's duration");
    assert!(report_ms >= 1000.0, "platform.report said {report_ms} ms");
    let report_line = text
        .lines()
        .find(|l| l.starts_with(&format!("REPORT RequestId: {id1}")))
        .expect("REPORT line");
    let duration: f64 = report_line
        .split("Duration: ")
        .nth(1)
        .and_then(|d| d.split(' ').next())
        .and_then(|d| d.parse().ok())
        .expect("a duration");
    assert!(duration < 1000.0, "{report_line}");

    // Idle past --idle-timeout, the environment is retired: SHUTDOWN reaches the extension.
    eventually("SHUTDOWN reaching the extension", || {
        log().contains("probe-ext SHUTDOWN spindown")
    })
    .await;
    server.stop();
}

/// The agent's peak resident memory (VmHWM) in the server's environments, in KiB.
fn agent_peak_kib(server: &Server) -> u64 {
    descendants(server.pid())
        .iter()
        .filter(|p| p.comm.starts_with("kindling-boots"))
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{}/status", p.pid)).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .max()
        .expect("a kindling-bootstrap process")
}

#[tokio::test]
async fn a_hostile_extension_neither_hangs_the_host_nor_grows_the_agent() {
    let Some(bins) = prerequisites(&["/usr/bin/python3"]) else {
        return;
    };
    let mut hog = with_extension("hog", "hog");
    hog.timeout = 2;
    let flood = with_extension("flood", "flood");
    let server = Server::start(bins, &[hog, flood]);

    // The hog never finishes its INVOKE: the caller has its answer, and at the
    // invocation's deadline the environment is reset, as Lambda's timeout resets it.
    let first = server.invoke("hog", &json!({})).await;
    assert_eq!(first.status, 200, "{}", server.diagnostics());
    let id1 = request_id(&first);
    let begun = Instant::now();
    let second = server.invoke("hog", &json!({})).await;
    println!(
        "second invocation behind the hog: {} after {:?}: {}",
        second.status,
        begun.elapsed(),
        String::from_utf8_lossy(&second.body)
    );
    assert!(begun.elapsed() < Duration::from_secs(12));
    eventually("the reset noted in the log", || {
        server.log("hog").contains(&format!(
            "{id1} Task timed out: extension(s) probe-ext still busy"
        ))
    })
    .await;
    // A fresh environment serves the next one.
    let third = server.invoke("hog", &json!({})).await;
    assert_eq!(third.status, 200, "{}", server.diagnostics());

    // 20 MiB of extension output and 8 MiB of function output, to a listener that takes
    // a second per batch: records are dropped and counted, the agent stays small.
    let flooded = server.invoke("flood", &json!({"print_mb": 8})).await;
    assert_eq!(flooded.status, 200, "{}", server.diagnostics());
    // Idle, the environment is frozen (as Lambda freezes it), the slow listener with it:
    // each invocation lets it run for the extension's second.
    let mut told = false;
    for _ in 0..10 {
        let again = server.invoke("flood", &json!({})).await;
        assert_eq!(again.status, 200, "{}", server.diagnostics());
        told = server
            .log("flood")
            .contains("probe-ext telemetry platform.logsDropped");
        if told {
            break;
        }
    }
    assert!(told, "no platform.logsDropped reached the listener");
    let peak = agent_peak_kib(&server);
    println!("agent peak RSS under the flood: {peak} KiB");
    assert!(peak < 48 * 1024, "the agent grew to {peak} KiB");
    server.stop();
}

#[tokio::test]
async fn an_exec_wrapper_starts_the_python_runtime() {
    let Some(bins) = prerequisites(&["/usr/bin/python3"]) else {
        return;
    };
    let mut f = FunctionDef::new(
        "wrapped",
        repo_path("tests/functions/extensions"),
        "python",
        "app.handler",
    );
    f.env = vec![(
        "AWS_LAMBDA_EXEC_WRAPPER".into(),
        "/var/task/wrapper.sh".into(),
    )];
    let server = Server::start(bins, &[f]);
    let answer = server.invoke("wrapped", &json!({})).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    assert_eq!(json(&answer)["wrapped_by"], "wrapper.sh");
    eventually("the wrapper's line", || {
        server
            .log("wrapped")
            .contains("wrapper got: /var/runtime/bootstrap")
    })
    .await;
    server.stop();
}
