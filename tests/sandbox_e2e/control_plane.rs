//! The control plane and the durable event queue through the clients users deploy with:
//! `tests/control_plane/lambda_api.py` drives a real `kindling serve` (sandbox isolation,
//! no functions file but its own) with boto3 and the AWS CLI (functions, versions and
//! aliases; invalid JSON, function URL configs and layers; 1,000 Event invocations across
//! a SIGKILL), SIGKILLs and restarts it, and
//! checks every answer; each check is one `ok:` line of the output.

use std::process::Command;

use crate::support::{prerequisites, repo_path, Scratch};

/// A Python that imports boto3 (PATH's, else Debian's, where `python3-boto3` puts it),
/// when the AWS CLI is there too; otherwise prints why the test skips.
fn python_with_boto3() -> Option<String> {
    let aws = Command::new("aws").arg("--version").output();
    let found = ["python3", "/usr/bin/python3"].into_iter().find(|python| {
        Command::new(python)
            .args(["-c", "import boto3"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    match (found, aws.is_ok_and(|o| o.status.success())) {
        (Some(python), true) => Some(python.to_string()),
        _ => {
            println!("SKIPPED: boto3 and the AWS CLI are needed (scripts/setup.sh installs python3-boto3 and awscli)");
            None
        }
    }
}

/// Runs one scenario of the script and fails with its output unless it passes.
fn scenario(args: &[&str]) {
    let Some(bins) = prerequisites(&[]) else {
        return;
    };
    let Some(python) = python_with_boto3() else {
        return;
    };
    let scratch = Scratch::new();
    let output = Command::new(python)
        .arg(repo_path("tests/control_plane/lambda_api.py"))
        .arg("--kindling")
        .arg(&bins.kindling)
        .arg("--scratch")
        .arg(scratch.path().join("run"))
        .args(args)
        .output()
        .expect("running lambda_api.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{text}");
    assert!(
        output.status.success() && text.contains("PASSED"),
        "lambda_api.py {args:?} failed:\n{text}"
    );
}

#[test]
fn deploy_update_list_and_delete_with_boto3_and_the_aws_cli() {
    scenario(&["api"]);
}

#[test]
fn invalid_json_function_url_configs_and_layers_with_boto3_and_the_aws_cli() {
    scenario(&["http"]);
}

#[test]
fn no_accepted_event_is_lost_when_the_server_is_killed() {
    scenario(&["durability", "--events", "1000"]);
}
