//! The real bootstrap with custom runtimes (`provided`): the bash runtime of AWS's
//! "Tutorial: Building a custom runtime", and small scripts that misbehave on purpose.

mod common;

use common::{function_env, have, Guest, Host, Record};

/// The tutorial's `bootstrap`, verbatim but for the interpreter: `set -o pipefail` and
/// `source` need bash, which Amazon Linux's /bin/sh is and Debian's is not.
const TUTORIAL_BOOTSTRAP: &str = r#"#!/bin/bash
set -euo pipefail

# Initialization - load function handler
source $LAMBDA_TASK_ROOT/"$(echo $_HANDLER | cut -d. -f1).sh"

# Processing
while true
do
  HEADERS="$(mktemp)"
  # Get an event. The HTTP request will block until one is received
  EVENT_DATA=$(curl -sS -LD "$HEADERS" "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/next")

  # Extract request ID by scraping response headers received above
  REQUEST_ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)

  # Run the handler function from the script
  RESPONSE=$($(echo "$_HANDLER" | cut -d. -f2) "$EVENT_DATA")

  # Send the response
  curl "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/$REQUEST_ID/response"  -d "$RESPONSE"
done
"#;

const TUTORIAL_FUNCTION: &str = r#"function handler () {
  EVENT_DATA=$1
  echo "$EVENT_DATA" 1>&2;
  RESPONSE="Echoing request: '$EVENT_DATA'"

  echo $RESPONSE
}
"#;

fn tutorial_guest() -> Guest {
    let guest = Guest::new();
    guest.write_task("bootstrap", TUTORIAL_BOOTSTRAP, true);
    guest.write_task("function.sh", TUTORIAL_FUNCTION, false);
    guest
}

#[tokio::test]
async fn tutorial_runtime_gets_events_and_its_results_reach_the_host() {
    if !have("curl") || !have("bash") {
        return;
    }
    let guest = tutorial_guest();
    let mut host = Host::new(guest.socket(), function_env("provided", "function.handler"));
    let _server = host.listen();
    let _bootstrap = guest.start(None);

    for (i, event) in [r#"{"n":1}"#, r#"{"n":2}"#].into_iter().enumerate() {
        let id = host.invoke(event);
        let Record::Response { body, headers, .. } = host.result(&id).await else {
            panic!("expected a response: {:#?}", host.history)
        };
        assert_eq!(
            body.as_ref(),
            format!("Echoing request: '{event}'").as_bytes()
        );
        // Relayed unchanged: curl -d's content type reaches the host.
        assert_eq!(headers["content-type"], "application/x-www-form-urlencoded");

        let report = host.report(&id);
        assert!(
            report.duration_ms > 0.0 && report.duration_ms < 10_000.0,
            "{report:?}"
        );
        assert!(
            report.max_memory_used_mb > 0 && report.max_memory_used_mb < 1024,
            "{report:?}"
        );
        // Init is measured once per runtime start, and reported with the first invocation.
        assert_eq!(report.init_duration_ms.is_some(), i == 0, "{report:?}");
        if let Some(init) = report.init_duration_ms {
            assert!(init > 0.0 && init < 10_000.0, "{report:?}");
        }

        // The handler echoed the event on stderr during the invocation: it is tagged with
        // the request id and reached the host before the report, which came before the result.
        assert!(
            host.logs(Some(&id)).contains(&format!("{event}\n")),
            "{:#?}",
            host.history
        );
        let log = host
            .position(|r| matches!(r, Record::Logs { id: Some(got), text } if *got == id && text.contains(event)))
            .unwrap();
        let report = host
            .position(|r| matches!(r, Record::Report { id: got, .. } if *got == id))
            .unwrap();
        let result = host
            .position(|r| matches!(r, Record::Response { id: got, .. } if *got == id))
            .unwrap();
        assert!(log < report && report < result, "{:#?}", host.history);
    }
    // This host predates frame streams: it refused the agent's one upgrade (404), and
    // every call above came over HTTP.
    let upgrades = host
        .history
        .iter()
        .filter(|r| matches!(r, Record::Other { path, .. } if path == kindling_wire::PATH_STREAM))
        .count();
    assert_eq!(upgrades, 1, "{:#?}", host.history);
}

/// A runtime that prints its environment into the function's log, then serves events.
const ENV_PRINTER: &str = r#"#!/bin/bash
env | sort
while true; do
  H=$(mktemp)
  curl -sS -D "$H" -o /dev/null "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/invocation/next"
  ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$H" | tr -d '[:space:]' | cut -d: -f2)
  curl -sS -o /dev/null "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/invocation/$ID/response" -d "{\"cwd\":\"$PWD\"}"
done
"#;

#[tokio::test]
async fn runtime_gets_the_reserved_environment_and_runs_in_the_task_root() {
    if !have("curl") || !have("bash") {
        return;
    }
    let guest = Guest::new();
    guest.write_task("bootstrap", ENV_PRINTER, true);
    let mut env = function_env("provided", "function.handler");
    // Reserved names cannot be overridden by the function's variables.
    env.variables.insert("AWS_REGION".into(), "moon-1".into());
    let mut host = Host::new(guest.socket(), env);
    let _server = host.listen();
    let _bootstrap = guest.start(None);

    let id = host.invoke("{}");
    let Record::Response { body, .. } = host.result(&id).await else {
        panic!("{:#?}", host.history)
    };
    let task = guest.task().canonicalize().unwrap();
    assert_eq!(
        body.as_ref(),
        format!(r#"{{"cwd":"{}"}}"#, task.display()).as_bytes()
    );

    let log = host.logs(None);
    let vars: std::collections::BTreeMap<&str, &str> =
        log.lines().filter_map(|l| l.split_once('=')).collect();
    for (key, want) in [
        ("_HANDLER", "function.handler"),
        ("AWS_LAMBDA_FUNCTION_NAME", "test-fn"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/test-fn"),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "2026/11/27/[$LATEST]abc"),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand"),
        ("AWS_REGION", "eu-west-1"),
        ("AWS_DEFAULT_REGION", "eu-west-1"),
        ("AWS_EXECUTION_ENV", "AWS_Lambda_provided"),
        ("TZ", "UTC"),
        ("PATH", "/usr/local/bin:/usr/bin:/bin:/opt/bin"),
        ("GREETING", "hi"),
        ("LAMBDA_TASK_ROOT", guest.task().to_str().unwrap()),
    ] {
        assert_eq!(vars.get(key).copied(), Some(want), "{key} in {log}");
    }
    assert!(
        vars["AWS_LAMBDA_RUNTIME_API"].starts_with("127.0.0.1:"),
        "{log}"
    );
    assert!(vars["LD_LIBRARY_PATH"].contains("/opt/lib"), "{log}");
    assert!(vars.contains_key("LANG"), "{log}");
    // Nothing of the bootstrap's own environment leaks into the runtime's.
    assert!(
        !vars.contains_key("KINDLING_HOST") && !vars.contains_key("CARGO_MANIFEST_DIR"),
        "{log}"
    );
}

/// Exits with the code the event names, or serves it.
const CRASHER: &str = r#"#!/bin/bash
echo "starting"
while true; do
  H=$(mktemp)
  EVENT=$(curl -sS -D "$H" "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/invocation/next")
  ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$H" | tr -d '[:space:]' | cut -d: -f2)
  case "$EVENT" in
    exit*) echo "dying with ${EVENT#exit }"; exit "${EVENT#exit }" ;;
    kill) echo "killing myself"; kill -9 $$ ;;
  esac
  curl -sS -o /dev/null "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/invocation/$ID/response" -d "ok $EVENT"
done
"#;

#[tokio::test]
async fn runtime_death_is_reported_and_the_runtime_restarts_with_a_new_init() {
    if !have("curl") || !have("bash") {
        return;
    }
    let guest = Guest::new();
    guest.write_task("bootstrap", CRASHER, true);
    let mut host = Host::new(guest.socket(), function_env("provided", "x.y"));
    let _server = host.listen();
    let _bootstrap = guest.start(None);

    let first = host.invoke("hello");
    host.result(&first).await;
    assert!(host.report(&first).init_duration_ms.is_some());

    let dies = host.invoke("exit 3");
    let exit = host.exit().await;
    assert_eq!(exit.request_id.as_deref(), Some(dies.as_str()));
    assert_eq!((exit.exit_code, exit.signal), (Some(3), None));
    // Measured before the runtime's cgroup went, for the failed invocation's REPORT.
    assert!(exit.max_memory_used_mb.is_some_and(|mb| mb > 0), "{exit:?}");
    // Its last words belong to the invocation and arrived before the exit.
    assert!(
        host.logs(Some(&dies)).contains("dying with 3\n"),
        "{:#?}",
        host.history
    );

    let killed = host.invoke("kill");
    let exit = host.exit().await;
    assert_eq!(exit.request_id.as_deref(), Some(killed.as_str()));
    assert_eq!((exit.exit_code, exit.signal), (None, Some(9)));

    // The next invocation is served by a restarted runtime, whose init is measured again.
    let after = host.invoke("again");
    let Record::Response { body, .. } = host.result(&after).await else {
        panic!("{:#?}", host.history)
    };
    assert_eq!(body.as_ref(), b"ok again");
    assert!(
        host.report(&after).init_duration_ms.is_some(),
        "{:#?}",
        host.history
    );
    // The restarted runtime's start-up line is outside any invocation.
    assert_eq!(
        host.logs(None).matches("starting\n").count(),
        3,
        "{:#?}",
        host.history
    );
}

#[tokio::test]
async fn bootstrap_waits_for_a_host_that_starts_late_and_survives_its_restart() {
    if !have("curl") || !have("bash") {
        return;
    }
    let guest = tutorial_guest();
    let mut host = Host::new(guest.socket(), function_env("provided", "function.handler"));
    let _bootstrap = guest.start(None);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let server = host.listen();

    let id = host.invoke("one");
    host.result(&id).await;
    host.wait_for("the next /next", |r| {
        matches!(r, Record::Next).then_some(())
    })
    .await;

    // The host goes away while the runtime waits on /next, and comes back.
    server.abort();
    let _ = server.await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let _server = host.listen();
    let id = host.invoke("two");
    let Record::Response { body, .. } = host.result(&id).await else {
        panic!("{:#?}", host.history)
    };
    assert_eq!(body.as_ref(), b"Echoing request: 'two'");
}

#[tokio::test]
async fn missing_bootstrap_is_an_init_error_and_a_clear_exit() {
    let guest = Guest::new();
    let mut host = Host::new(guest.socket(), function_env("provided", "x.y"));
    let _server = host.listen();
    let mut bootstrap = guest.start(None);
    let body = host
        .wait_for("an init error", |r| match r {
            Record::InitError { body, .. } => Some(body.clone()),
            _ => None,
        })
        .await;
    let error: kindling_wire::ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!(error.error_type, "Runtime.InvalidEntrypoint");
    assert!(error.error_message.contains("bootstrap"), "{error:?}");
    let status = tokio::time::timeout(common::PATIENCE, bootstrap.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success());
}

#[tokio::test]
async fn host_over_vsock() {
    if !have("curl") || !have("bash") {
        return;
    }
    let guest = tutorial_guest();
    let mut host = Host::new(guest.socket(), function_env("provided", "function.handler"));
    let port = 20_000 + std::process::id() % 20_000;
    let Some(_server) = host.listen_vsock(port) else {
        return;
    };
    let _bootstrap = guest.start_with_host(None, &format!("vsock://1:{port}"));
    let id = host.invoke("over vsock");
    let Record::Response { body, .. } = host.result(&id).await else {
        panic!("{:#?}", host.history)
    };
    assert_eq!(body.as_ref(), b"Echoing request: 'over vsock'");
}

/// Writes many lines, and an unterminated one, during each invocation.
const CHATTY: &str = r#"#!/bin/bash
while true; do
  H=$(mktemp)
  curl -sS -D "$H" -o /dev/null "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/invocation/next"
  ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$H" | tr -d '[:space:]' | cut -d: -f2)
  seq 1 3000
  printf 'no newline'
  curl -sS -o /dev/null "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/invocation/$ID/response" -d done
done
"#;

#[tokio::test]
async fn many_log_lines_arrive_batched_in_order_and_complete_before_the_report() {
    if !have("curl") || !have("bash") {
        return;
    }
    let guest = Guest::new();
    guest.write_task("bootstrap", CHATTY, true);
    let mut host = Host::new(guest.socket(), function_env("provided", "x.y"));
    let _server = host.listen();
    let _bootstrap = guest.start(None);

    for _ in 0..2 {
        let id = host.invoke("{}");
        host.result(&id).await;
        let want: String = (1..=3000)
            .map(|n| format!("{n}\n"))
            .chain(["no newline\n".to_string()])
            .collect();
        assert_eq!(host.logs(Some(&id)), want);
        let posts = host
            .history
            .iter()
            .filter(|r| matches!(r, Record::Logs { id: Some(got), .. } if *got == id))
            .count();
        assert!(posts < 100, "{posts} log posts for 3001 lines");
        let last_log = host
            .history
            .iter()
            .rposition(|r| matches!(r, Record::Logs { id: Some(got), .. } if *got == id))
            .unwrap();
        let report = host
            .position(|r| matches!(r, Record::Report { id: got, .. } if *got == id))
            .unwrap();
        assert!(last_log < report);
    }
}

/// Prints 32 MiB (32768 lines of 1023 zeros) as fast as it can, then answers.
const FLOODER: &str = r#"#!/bin/bash
while true; do
  H=$(mktemp)
  curl -sS -D "$H" -o /dev/null "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/invocation/next"
  ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$H" | tr -d '[:space:]' | cut -d: -f2)
  yes "$(printf '%01023d' 0)" | head -n 32768
  curl -sS -o /dev/null "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/invocation/$ID/response" -d done
done
"#;

#[tokio::test]
async fn output_faster_than_the_host_takes_it_is_dropped_with_a_marker_never_blocking() {
    if !have("curl") || !have("bash") || !have("yes") || !have("head") {
        return;
    }
    let guest = Guest::new();
    guest.write_task("bootstrap", FLOODER, true);
    let mut host = Host::new(guest.socket(), function_env("provided", "x.y"));
    host.delay_logs(std::time::Duration::from_millis(200));
    let _server = host.listen();
    let bootstrap = guest.start(None);

    let id = host.invoke("{}");
    // The runtime was not blocked on its output: its answer came, within the patience.
    let Record::Response { body, .. } = host.result(&id).await else {
        panic!("{:#?}", host.history)
    };
    assert_eq!(body.as_ref(), b"done");

    // What reached the host, and the markers of what did not, account for every byte.
    let log = host.logs(Some(&id));
    let (markers, lines): (Vec<&str>, Vec<&str>) =
        log.lines().partition(|l| l.starts_with("[kindling] "));
    let lost: u64 = markers
        .iter()
        .map(|m| {
            let n = m
                .strip_prefix("[kindling] ")
                .and_then(|m| {
                    m.strip_suffix(
                        " bytes of log dropped: the function logged faster than the host took them",
                    )
                })
                .unwrap_or_else(|| panic!("not a marker: {m}"));
            n.parse::<u64>().unwrap()
        })
        .sum();
    assert!(
        lost > 0,
        "nothing was dropped: {} lines arrived",
        lines.len()
    );
    let zeros = "0".repeat(1023);
    assert!(lines.iter().all(|l| *l == zeros), "a line arrived damaged");
    let kept = u64::try_from(lines.len() * 1024).unwrap();
    assert_eq!(kept + lost, 32 << 20, "{} markers", markers.len());
    // At most the pending bound plus one round of posts in flight went through in the
    // meantime, not the 32 MiB.
    assert!(kept < 16 << 20, "{kept} bytes arrived");

    // The agent's own memory stayed small.
    let pid = bootstrap.0.id().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix(" kB"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    println!("kindling-bootstrap peak RSS: {peak_kb} kB; {kept} bytes kept, {lost} dropped");
    assert!(
        peak_kb < 24 << 10,
        "kindling-bootstrap peaked at {peak_kb} kB"
    );
}

/// Its first start dies while its `/next` is still waiting; later starts serve events.
const DIES_WAITING: &str = r#"#!/bin/bash
if [ ! -e "$LAMBDA_TASK_ROOT/started-once" ]; then
  touch "$LAMBDA_TASK_ROOT/started-once"
  curl -sS "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/invocation/next" &
  sleep 0.3
  exit 2
fi
while true; do
  H=$(mktemp)
  EVENT=$(curl -sS -D "$H" "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/invocation/next")
  ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$H" | tr -d '[:space:]' | cut -d: -f2)
  curl -sS -o /dev/null "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/invocation/$ID/response" -d "served $EVENT"
done
"#;

#[tokio::test]
async fn an_event_never_goes_to_a_dead_runtime() {
    if !have("curl") || !have("bash") {
        return;
    }
    let guest = Guest::new();
    guest.write_task("bootstrap", DIES_WAITING, true);
    let mut host = Host::new(guest.socket(), function_env("provided", "x.y"));
    let _server = host.listen();
    let _bootstrap = guest.start(None);

    let exit = host.exit().await;
    assert_eq!((exit.request_id, exit.exit_code), (None, Some(2)));
    // The restarted runtime's /next is waiting too.
    host.wait_for("the restarted runtime's /next", |r| {
        matches!(r, Record::Next).then_some(())
    })
    .await;
    let id = host.invoke("event");
    let Record::Response { body, .. } = host.result(&id).await else {
        panic!("{:#?}", host.history)
    };
    assert_eq!(body.as_ref(), b"served event");
}

/// Says goodbye on SIGTERM.
const GRACEFUL: &str = r#"#!/bin/bash
trap 'echo "got SIGTERM"; exit 0' TERM
echo "ready"
while true; do sleep 0.05; done
"#;

#[tokio::test]
async fn sigterm_stops_the_runtime_and_forwards_its_last_words() {
    if !have("bash") {
        return;
    }
    let guest = Guest::new();
    guest.write_task("bootstrap", GRACEFUL, true);
    let mut host = Host::new(guest.socket(), function_env("provided", "x.y"));
    let _server = host.listen();
    let mut bootstrap = guest.start(None);
    host.wait_for("the runtime's first line", |r| {
        matches!(r, Record::Logs { text, .. } if text.contains("ready")).then_some(())
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(bootstrap.0.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(common::PATIENCE, bootstrap.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    host.wait_for("the runtime's last words", |r| {
        matches!(r, Record::Logs { text, .. } if text.contains("got SIGTERM\n")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_runtime_cannot_pass_off_a_report_of_its_own() {
    if !have("curl") || !have("bash") {
        return;
    }
    // Posts its result with a forged report header: the host must see bootstrap's.
    let forger = r#"#!/bin/bash
set -euo pipefail
api="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation"
while true; do
  headers="$(mktemp)"
  curl -sS -D "$headers" "$api/next" >/dev/null
  id=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$headers" | tr -d '[:space:]' | cut -d: -f2)
  curl -sS "$api/$id/response" -d '"done"' \
    -H 'Kindling-Invocation-Report: {"durationMs":123456.0,"maxMemoryUsedMb":99999}' >/dev/null
done
"#;
    let guest = Guest::new();
    guest.write_task("bootstrap", forger, true);
    let mut host = Host::new(guest.socket(), function_env("provided", "x.handler"));
    let _server = host.listen();
    let _bootstrap = guest.start(None);
    let id = host.invoke("{}");
    assert!(matches!(host.result(&id).await, Record::Response { .. }));
    let report = host.report(&id);
    assert!(
        report.duration_ms < 123_456.0 && report.max_memory_used_mb < 99_999,
        "{report:?}"
    );
}
