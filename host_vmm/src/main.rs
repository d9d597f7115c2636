//! `kindling-vmm`: one microVM per process, configured like Firecracker (`--config-file` with
//! `--no-api`, or the REST API on `--api-sock`). Exits with the VM's exit code (see
//! `ExitReason::exit_code`); 1 for configuration and start-up errors, 2 for bad arguments.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use kindling_vmm::config::VmmConfig;
use kindling_vmm::devices::serial::SerialOut;
use kindling_vmm::exit::ExitReason;
use kindling_vmm::signals::{block_termination_signals, TermSignals};
use kindling_vmm::vm::Timings;
use kindling_vmm::vmm::build_vm;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A compact KVM VMM for Kindling guests (Firecracker-compatible subset)"
)]
struct Cli {
    /// Path of the API Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Firecracker-style JSON configuration; with --no-api the VM starts at once.
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Run without the API socket (requires --config-file).
    #[arg(long)]
    no_api: bool,
    /// Where the guest console goes: `stdout`, `none` or a file path.
    #[arg(long, value_name = "stdout|none|PATH", default_value = "stdout")]
    serial_out: String,
    /// Print a machine-readable timing line (JSON, on stderr) when the VM stops.
    #[arg(long)]
    timings: bool,
    /// Accepted for Firecracker compatibility: the boot timer is always on.
    #[arg(long)]
    boot_timer: bool,
}

fn serial_out(spec: &str) -> anyhow::Result<SerialOut> {
    Ok(match spec {
        "stdout" => Box::new(std::io::stdout()),
        "none" => Box::new(std::io::sink()),
        path => {
            Box::new(File::create(path).with_context(|| format!("creating serial output {path}"))?)
        }
    })
}

/// What `--timings` prints, as one JSON line.
fn timings_line(
    process_start: Instant,
    instance_start: Instant,
    t: &Timings,
    rss_kib: Option<u64>,
    reason: &ExitReason,
) -> String {
    let us = |d: Option<std::time::Duration>| d.map(|d| d.as_micros() as u64);
    serde_json::json!({
        "kindling_vmm_timings": {
            "process_start_to_instance_start_us": instance_start.duration_since(process_start).as_micros() as u64,
            "instance_start_to_first_kvm_run_us": us(t.first_kvm_run),
            "boot_timer_us": us(t.boot_timer),
            "vmm_rss_kib_excluding_guest": rss_kib,
            "exit_reason": reason.to_string(),
            "exit_code": reason.exit_code(),
        }
    })
    .to_string()
}

fn run(cli: Cli, process_start: Instant) -> anyhow::Result<ExitReason> {
    if !cli.no_api {
        bail!("the API socket is not available in this build: use --no-api --config-file FILE");
    }
    if cli.api_sock.is_some() {
        bail!("--api-sock and --no-api exclude each other");
    }
    let Some(path) = &cli.config_file else {
        bail!("--no-api needs --config-file");
    };
    let json =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config = VmmConfig::from_json(&json)?;
    let instance_start = Instant::now();
    let (mut vm, entry) = build_vm(&config, serial_out(&cli.serial_out)?)?;
    vm.add_subscriber(Arc::new(Mutex::new(TermSignals::new(vm.exit().clone())?)));
    let running = vm.start(entry, instance_start)?;
    let rss = running.vmm_rss_kib().ok();
    let (reason, timings) = running.wait();
    tracing::info!("VM stopped: {reason}");
    if cli.timings {
        let line = timings_line(process_start, instance_start, &timings, rss, &reason);
        let _ = writeln!(std::io::stderr(), "{line}");
    }
    Ok(reason)
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    if let Err(e) = block_termination_signals() {
        eprintln!("kindling-vmm: blocking termination signals: {e}");
        return ExitCode::from(1);
    }
    match run(cli, process_start) {
        Ok(reason) => ExitCode::from(reason.exit_code() as u8),
        Err(e) => {
            eprintln!("kindling-vmm: {e:#}");
            ExitCode::from(1)
        }
    }
}
