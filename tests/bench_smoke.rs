//! `kindling bench` through the real binary: a short sandbox-only bench prints every row
//! of its table for both no-op functions (python and `provided`), and bad arguments are
//! refused with a clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const KINDLING: &str = env!("CARGO_BIN_EXE_kindling");
/// The bench function is a python handler.
const PYTHON: &str = "/usr/bin/python3";

fn kindling(args: &[&str]) -> Output {
    Command::new(KINDLING)
        .args(args)
        .output()
        .expect("kindling runs")
}

/// Why this machine cannot run a sandbox bench, if it cannot.
fn unable() -> Option<String> {
    let euid = procfs::process::Process::myself()
        .and_then(|p| p.status())
        .map(|s| s.euid);
    if euid.ok() != Some(0) {
        return Some("the sandbox needs root".to_string());
    }
    if !Path::new(PYTHON).exists() {
        // The sandbox's root is the host's /usr: the bench function's runtime comes from there.
        return Some(format!("{PYTHON} is not installed"));
    }
    kindling_images::locate::guest_bin_dir().err()
}

/// `cargo test` builds `kindling` but neither the sandbox helper, which must sit beside
/// it (same folder, same profile: instant when up to date), nor the bench's `provided`
/// no-op, the static lambda_runtime program that `scripts/build-guest.sh` builds beside
/// the guest binaries (built here the same way, into the same target folder).
fn build_helpers() {
    let profile_dir = Path::new(KINDLING)
        .parent()
        .expect("kindling is in a folder");
    let target_dir: PathBuf = profile_dir.parent().expect("a target folder").into();
    let profile = match profile_dir.file_name().and_then(|p| p.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let cargo = || {
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.arg("build")
            .arg("--target-dir")
            .arg(&target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        cmd
    };
    let status = cargo()
        .args(["-p", "kindling-sandbox", "--profile", profile])
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building kindling-sandbox-exec failed");
    let status = cargo()
        .args(["-p", "kindling-test-lambda-rs-runtime", "--release"])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the provided no-op failed");
}

#[test]
fn a_sandbox_bench_prints_every_row() {
    if let Some(reason) = unable() {
        println!("SKIPPED: {reason}");
        return;
    }
    build_helpers();
    let out = kindling(&[
        "bench",
        "--runs",
        "1",
        "--invokes",
        "20",
        "--isolation",
        "sandbox",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kindling bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let floor_row = |measurement: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(measurement))
            .unwrap_or_else(|| panic!("no {measurement:?} row in:\n{stdout}"))
    };
    for floor in [
        "floor: 2 HTTP round trips, p50",
        "floor: 2 HTTP round trips, p99",
    ] {
        let line = floor_row(floor);
        assert!(line.contains(" µs") || line.contains(" ms"), "{stdout}");
    }
    assert!(
        floor_row("floor: CPU per round-trip pair").contains(" µs"),
        "{stdout}"
    );
    // Both no-op functions, each with every row of its own.
    for env in ["sandbox python", "sandbox provided"] {
        let row = |measurement: &str| {
            stdout
                .lines()
                .find(|l| l.trim_start().starts_with(measurement) && l.contains(env))
                .unwrap_or_else(|| panic!("no {measurement:?} row for {env} in:\n{stdout}"))
        };
        for warm in ["warm invoke, p50", "warm invoke, p99"] {
            let line = row(warm);
            let ratio = line
                .split_whitespace()
                .find_map(|word| word.strip_suffix('×'))
                .and_then(|r| r.parse::<f64>().ok());
            assert!(
                ratio.is_some_and(|r| r > 0.0),
                "no ratio to the floor: {line}"
            );
            assert!(line.contains("target ≤"), "{line}");
        }
        for rate in ["throughput, 1 client", "throughput, 4 clients"] {
            let line = row(rate);
            assert!(line.contains(" /s") && line.contains("target ≥"), "{line}");
        }
        // Where a warm invoke's time goes: the sandbox shares the host's clock, so the
        // agent's stamps split the crossings each way.
        for hop in [
            "hop: caller ↔ host",
            "hop: read",
            "hop: schedule",
            "hop: dispatch",
            "hop: to-agent",
            "hop: runtime",
            "hop: to-host",
            "hop: result",
            "hop: answer",
        ] {
            assert!(row(hop).contains(" µs"), "{stdout}");
        }
        for cpu in ["server", "environment", "total"] {
            let line = row(&format!("CPU per warm invoke, {cpu}"));
            let us = line
                .split_whitespace()
                .zip(line.split_whitespace().skip(1))
                .find_map(|(n, unit)| (unit == "µs").then(|| n.parse::<f64>().ok()).flatten());
            assert!(us.is_some_and(|us| us > 0.0), "no CPU figure: {line}");
        }
        let total = row("CPU per warm invoke, total");
        assert!(
            total.contains("target ≤ 60 µs: ") && total.contains("× "),
            "no ratio to the floor's CPU: {total}"
        );
        assert!(
            row("server RSS, before → after").contains(" MiB → "),
            "{stdout}"
        );
        assert!(
            row("server fds, before → after").contains(" → "),
            "{stdout}"
        );
        // The cold start and its phases, from the stamps the host, init's launcher and the
        // agent take: durations in whatever unit they took (a smoke test, not a speed
        // target: a first python start on a cold page cache took 1.9 s here).
        for phase in [
            "cold start, invoke → answer",
            "Sandbox Setup",
            "Init Start",
            "Agent Start",
            "Init Duration",
            "rest (total − phases)",
        ] {
            let line = row(phase);
            assert!(line.contains(" ms") || line.contains(" s"), "{stdout}");
        }
        // In the order they happen: the runtime's own start comes after the agent's.
        let at = |phase: &str| stdout.find(row(phase)).expect("a row of the output");
        assert!(
            at("Sandbox Setup") < at("Init Start")
                && at("Init Start") < at("Agent Start")
                && at("Agent Start") < at("Init Duration"),
            "{stdout}"
        );
    }
    assert!(
        !stdout.contains("microVM") && !stdout.contains('†'),
        "a sandbox-only bench measured a microVM:\n{stdout}"
    );
}

#[test]
fn bad_arguments_are_refused_clearly() {
    for (args, expected) in [
        (&["bench", "--runs", "0"][..], "--runs"),
        (
            &["bench", "--isolation", "vm"][..],
            r#""vm" is not one of "sandbox", "microvm""#,
        ),
        (
            &["bench", "--hypervisor", "xen"][..],
            r#""xen" is not one of "kindling", "qemu""#,
        ),
        (&["bench", "--invokes", "2"][..], "--invokes"),
    ] {
        let out = kindling(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn missing_images_are_a_clear_error() {
    if let Err(reason) = kindling_images::locate::guest_bin_dir() {
        println!("SKIPPED: {reason}");
        return;
    }
    let empty = tempfile::tempdir().expect("a temporary folder");
    let out = Command::new(KINDLING)
        .args(["bench", "--isolation", "microvm"])
        .env("XDG_CACHE_HOME", empty.path())
        .output()
        .expect("kindling runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bench without images succeeded");
    assert!(stderr.contains("kindling images build"), "{stderr}");
    assert!(out.stdout.is_empty(), "printed a table without images");
}
