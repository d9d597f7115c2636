//! One invocation through everything real: the host's Runtime API server on the
//! environment's socket, the sandbox, the guest's `init` and `kindling-bootstrap`
//! (built by `scripts/build-guest.sh`), and the bash custom runtime of AWS's tutorial
//! (`examples/hello-bash`, which needs bash and curl on the host).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kindling_runtime_api::environment::{EnvironmentSpec, Function, Isolation, Launcher, StopMode};
use kindling_runtime_api::logs::LogSink;
use kindling_runtime_api::runtime_server::{Invocation, Outcome, RuntimeApi};
use kindling_sandbox::{SandboxLauncher, SandboxOptions};
use kindling_wire::FunctionEnvironment;
use nix::unistd::geteuid;

fn skip_reason() -> Option<String> {
    if !geteuid().is_root() {
        return Some("the sandbox needs root".into());
    }
    if !std::path::Path::new("/usr/bin/curl").exists() {
        return Some("the bash runtime needs /usr/bin/curl".into());
    }
    kindling_images::locate::guest_bin_dir().err()
}

#[tokio::test]
async fn the_aws_tutorial_runtime_answers_through_the_sandbox() {
    if let Some(reason) = skip_reason() {
        println!("SKIPPED: {reason}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let function = Function {
        name: "hello-bash".into(),
        code: Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello-bash"),
        runtime: "provided".into(),
        handler: "function.handler".into(),
        memory_mb: 128,
        timeout: Duration::from_secs(10),
        isolation: Isolation::Sandbox,
        max_concurrency: 1,
        env: BTreeMap::new(),
        snapstart: false,
        network: kindling_runtime_api::environment::Network::Outbound,
        layers: Vec::new(),
        credentials: None,
    };
    let spec = EnvironmentSpec {
        id: format!("e2e-{}", std::process::id()),
        dir: tmp.path().join("env"),
        function: function.clone(),
    };
    std::fs::create_dir(&spec.dir).unwrap();
    let logs = Arc::new(LogSink::new(&tmp.path().join("logs")).unwrap());
    let api = RuntimeApi::bind(
        &spec.runtime_api_socket(),
        FunctionEnvironment {
            function_name: function.name.clone(),
            function_version: "$LATEST".into(),
            memory_mb: function.memory_mb,
            timeout_ms: 10_000,
            runtime: function.runtime.clone(),
            handler: function.handler.clone(),
            region: "us-east-1".into(),
            account_id: "123456789012".into(),
            log_group_name: "/aws/lambda/hello-bash".into(),
            log_stream_name: "sandbox".into(),
            initialization_type: "on-demand".into(),
            variables: BTreeMap::new(),
        },
        logs.clone(),
    )
    .unwrap();

    let launcher = SandboxLauncher::new(SandboxOptions {
        exec: Some(env!("CARGO_BIN_EXE_kindling-sandbox-exec").into()),
        cgroup_parent: "kindling-test".into(),
        ..SandboxOptions::default()
    });
    assert_eq!(launcher.name(), "sandbox");
    let mut env = launcher.start(&spec).await.unwrap();

    let ticket = api.submit(Invocation {
        request_id: "8476a536-e9f4-11e8-9739-2dfe598c3fcd".into(),
        payload: Bytes::from_static(br#"{"text":"Hello"}"#),
        function_arn: "arn:aws:lambda:us-east-1:123456789012:function:hello-bash".into(),
        trace_id: "Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700".into(),
        client_context: None,
        cognito_identity: None,
        timeout: function.timeout,
        entropy: None,
        network: None,
        stream: None,
    });
    let done = tokio::time::timeout(Duration::from_secs(30), ticket.done).await;
    let console = std::fs::read_to_string(spec.console_log()).unwrap_or_default();
    let completion = done
        .unwrap_or_else(|_| panic!("no answer within 30 s; console:\n{console}"))
        .unwrap();
    assert_eq!(
        completion.outcome,
        Outcome::Response(Bytes::from_static(
            br#"Echoing request: '{"text":"Hello"}'"#
        )),
        "console:\n{console}"
    );
    // The handler echoes the event on stderr, which bootstrap forwards to the host.
    assert!(
        completion.log.contains(r#"{"text":"Hello"}"#),
        "log: {:?}",
        completion.log
    );
    assert!(env.is_alive());

    env.stop(StopMode::Graceful(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(!spec.dir.exists(), "the environment's dir was left");
}
