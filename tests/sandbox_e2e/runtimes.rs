//! Each kind of runtime answers through the sandbox: the AWS tutorial's bash custom
//! runtime, our Python and Node runtimes, and a runtime built with AWS's `lambda_runtime`
//! crate; and the `kindling run`, `kindling invoke` and `kindling logs` commands.

use serde_json::json;

use crate::unprivileged::{check_guest_privileges, check_unprivileged};

use crate::support::{
    eventually, json, prerequisites, repo_path, request_id, FunctionDef, Scratch, Server,
};

#[tokio::test]
async fn aws_tutorial_bash_runtime_echoes_the_event() {
    let Some(bins) = prerequisites(&["/bin/bash", "/usr/bin/curl"]) else {
        return;
    };
    let server = Server::start(
        bins,
        &[FunctionDef::new(
            "tutorial",
            repo_path("examples/hello-bash"),
            "provided-debian",
            "function.handler",
        )],
    );
    // `function` is the emulator's alias of a server's only function.
    for name in ["tutorial", "function"] {
        let answer = server.invoke(name, &json!({"text": "Hello"})).await;
        assert_eq!(answer.status, 200, "{}", server.diagnostics());
        assert_eq!(answer.function_error, None);
        assert_eq!(&answer.body[..], br#"Echoing request: '{"text":"Hello"}'"#);
    }
    // The tutorial's handler echoes the event on stderr: it reaches the function's log.
    assert!(server.log("tutorial").contains(r#"{"text":"Hello"}"#));
    server.stop();
}

#[tokio::test]
async fn python_handler_gets_its_context_and_variables() {
    let Some(bins) = prerequisites(&["/usr/bin/python3"]) else {
        return;
    };
    let mut hello = FunctionDef::new(
        "hello-py",
        repo_path("examples/hello-python"),
        "python",
        "app.handler",
    );
    hello.memory = 256;
    hello.env = vec![("GREETING".into(), "Howdy".into())];
    let server = Server::start(bins, &[hello]);
    let answer = server.invoke("hello-py", &json!({"name": "e2e"})).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    assert_eq!(
        answer
            .headers
            .get("x-amz-executed-version")
            .map(|v| v.as_bytes()),
        Some(&b"$LATEST"[..])
    );
    let body = json(&answer);
    assert_eq!(body["message"], "Howdy, e2e!");
    assert_eq!(body["request_id"], request_id(&answer).as_str());
    assert_eq!(body["function"], "hello-py");
    // A string, as in AWS's Python runtime (it is read from the environment).
    assert_eq!(body["memory_mb"], "256");
    let remaining = body["remaining_ms"].as_i64().expect("remaining_ms");
    assert!((1..=5000).contains(&remaining), "remaining_ms {remaining}");
    assert!(server.log("hello-py").contains("greeting e2e"));
    server.stop();
}

/// The Python runtime starts from the root image's compiled copy (no compilation on a cold
/// start), and imports neither `socket` nor `importlib` for itself.
#[tokio::test]
async fn python_runtime_starts_compiled_and_lean() {
    let Some(bins) = prerequisites(&["/usr/bin/python3"]) else {
        return;
    };
    let server = Server::start(bins, &[FunctionDef::python_case("start", "runtime_start")]);
    let answer = server.invoke("start", &json!({})).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    let start = json(&answer);
    let cached = start["cached"].as_str().unwrap_or_default();
    // kindling_runtime.cpython-3NN.pyc: the image's interpreter names it.
    assert!(
        cached.starts_with("/var/runtime/__pycache__/kindling_runtime.")
            && cached.ends_with(".pyc"),
        "{start}"
    );
    assert_eq!(start["checked_hash"], true, "{start}");
    assert_eq!(start["matches_source"], true, "{start}");
    assert_eq!(start["imported"], json!([]), "{start}");
    server.stop();
}

/// The probe function's answer to `action`, from a sandbox; `None` where python is missing.
async fn probe(action: &str) -> Option<serde_json::Value> {
    let bins = prerequisites(&["/usr/bin/python3"])?;
    let server = Server::start(bins, &[FunctionDef::probe()]);
    let answer = server.invoke("probe", &json!({ "action": action })).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    server.stop();
    Some(json(&answer))
}

/// The function cannot use the sandbox's root: no uid 0, no capabilities, no way back; init
/// and the agent keep only the capabilities they use.
#[tokio::test]
async fn the_runtime_runs_unprivileged() {
    let Some(answer) = probe("identity").await else {
        return;
    };
    if let Err(e) = check_unprivileged(&answer) {
        panic!("{e}");
    }
    if let Err(e) = check_guest_privileges(&answer, false) {
        panic!("{e}");
    }
    // And its ids, root's included, are not the host's: the sandbox's user namespace maps
    // them onto a host range of its own, far from host root.
    let map: Vec<&str> = answer["uid_map"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let host_first: u32 = map[1].parse().unwrap();
    assert_eq!((map[0], map[2]), ("0", "65536"), "{map:?}");
    assert!(host_first >= 0x1000_0000, "{map:?}");
}

/// The host kernel's views that a sandboxed function shares with the host are runc's:
/// masked (the host's timers, keys, firmware tables) or read-only (its tunables).
#[tokio::test]
async fn host_kernel_views_are_masked_and_tunables_read_only() {
    let Some(answer) = probe("kernel_views").await else {
        return;
    };
    let views = &answer["views"];
    // Covered by /dev/null: readable and empty (unmasked, /proc/timer_list is root's only).
    for path in ["/proc/timer_list", "/proc/keys"] {
        if std::path::Path::new(path).exists() {
            assert_eq!(views["read"][path], "", "{path}: {views}");
        }
    }
    // Covered by an empty tmpfs (the host's lists acpi, memmap, …).
    for path in ["/sys/firmware", "/proc/acpi"] {
        if std::path::Path::new(path).exists() {
            assert_eq!(views["listing"][path], json!([]), "{path}: {views}");
        }
    }
    // A read-only mount answers EROFS (30) before any permission check could (EACCES).
    assert_eq!(
        views["write_errno"]["/proc/sys/kernel/hostname"],
        nix::libc::EROFS,
        "{views}"
    );
}

#[tokio::test]
async fn node_async_handler_answers() {
    let Some(bins) = prerequisites(&[]) else {
        return;
    };
    let server = Server::start(
        bins,
        &[FunctionDef::new(
            "hello-node",
            repo_path("examples/hello-node"),
            "node",
            "index.handler",
        )],
    );
    for name in ["first", "second"] {
        let answer = server.invoke("hello-node", &json!({"name": name})).await;
        assert_eq!(answer.status, 200, "{}", server.diagnostics());
        let body = json(&answer);
        assert_eq!(body["message"], format!("Hello, {name}!"));
        assert_eq!(body["request_id"], request_id(&answer).as_str());
    }
    assert!(server.log("hello-node").contains("greeting second"));
    server.stop();
}

#[tokio::test]
async fn lambda_runtime_crate_runs_unmodified() {
    let Some(bins) = prerequisites(&[]) else {
        return;
    };
    // A custom runtime's code dir holds its `bootstrap` executable.
    let code = Scratch::new();
    std::fs::copy(&bins.lambda_rs_bootstrap, code.path().join("bootstrap"))
        .expect("copying the lambda_runtime bootstrap");
    let server = Server::start(
        bins,
        &[FunctionDef::new(
            "rusty",
            code.path(),
            "provided",
            "unused.handler",
        )],
    );
    let answer = server.invoke("rusty", &json!({"ping": [1, 2]})).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    let body = json(&answer);
    assert_eq!(body["runtime"], "lambda_runtime");
    assert_eq!(body["event"], json!({"ping": [1, 2]}));
    assert_eq!(body["request_id"], request_id(&answer).as_str());
    assert_eq!(body["function_name"], "rusty");
    assert_eq!(body["memory_mb"], 128);
    let arn = body["function_arn"].as_str().expect("function_arn");
    assert!(arn.ends_with(":function:rusty"), "{arn}");
    server.stop();
}

#[tokio::test]
async fn cli_invoke_and_logs_talk_to_the_server() {
    let Some(bins) = prerequisites(&["/usr/bin/python3"]) else {
        return;
    };
    let server = Server::start(bins, &[FunctionDef::python_case("echo", "echo")]);
    let out = server.cli(&[
        "invoke",
        "echo",
        "--payload",
        r#"{"id":"from-cli"}"#,
        "--log",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    let body: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    assert_eq!(body["id"], "from-cli");
    let rid = body["request_id"].as_str().expect("request_id");
    // --log prints the invocation's log tail on stderr.
    assert!(
        stderr.contains(&format!("START RequestId: {rid}")),
        "{stderr}"
    );
    assert!(stderr.contains("echo from-cli"), "{stderr}");

    let out = server.cli(&["logs", "echo"]);
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        format!("START RequestId: {rid} Version: $LATEST"),
        "echo from-cli".to_string(),
        format!("END RequestId: {rid}"),
        format!("REPORT RequestId: {rid}\tDuration: "),
    ] {
        assert!(log.contains(&line), "{line:?} not in:\n{log}");
    }

    let out = server.cli(&["invoke", "nobody", "--payload", "{}"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("404"), "{stderr}");
    let out = server.cli(&["logs", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no log for \"nobody\""));
    server.stop();
}

#[tokio::test]
async fn kindling_run_serves_one_function_and_prints_its_log() {
    let Some(bins) = prerequisites(&["/usr/bin/python3"]) else {
        return;
    };
    let server = Server::run(
        bins,
        &repo_path("examples/hello-python"),
        "python",
        "app.handler",
    );
    // Named after its code folder, and reachable as the emulator's `function` too.
    for name in ["hello-python", "function"] {
        let answer = server.invoke(name, &json!({"name": name})).await;
        assert_eq!(answer.status, 200, "{}", server.diagnostics());
        assert_eq!(json(&answer)["message"], format!("Hello, {name}!"));
        let report = format!("hello-python | REPORT RequestId: {}\t", request_id(&answer));
        eventually(&format!("{report:?} on stdout"), || {
            server.stdout().contains(&report)
        })
        .await;
    }
    server.stop();
}
