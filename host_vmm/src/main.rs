//! `kindling-vmm`: one microVM per process, configured like Firecracker: `--config-file` with
//! `--no-api`, the REST API on `--api-sock`, or both (the file boots the VM, the API controls
//! it). Exits with the VM's exit code (see
//! `ExitReason::exit_code`); 1 for configuration and start-up errors, 2 for bad arguments.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use kindling_vmm::api::{server, ApiState, Start, StartRequest};
use kindling_vmm::config::VmmConfig;
use kindling_vmm::devices::serial::SerialOut;
use kindling_vmm::exit::ExitReason;
use kindling_vmm::metrics::{self, ConsoleMilestones, Milestones};
use kindling_vmm::seccomp::{Filters, ThreadKind};
use kindling_vmm::signals::{block_termination_signals, termination_pending, TermSignals};
use kindling_vmm::vm::{RunningVm, Vm, VmError};
use kindling_vmm::vmm::{build_vm, restore_vm};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A compact KVM VMM for Kindling guests (Firecracker-compatible subset)"
)]
struct Cli {
    /// Path of the API Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Firecracker-style JSON configuration: the VM starts from it at once; with --api-sock
    /// the API then serves the running VM (pause, snapshots, Ctrl-Alt-Del).
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Run without the API socket (requires --config-file).
    #[arg(long)]
    no_api: bool,
    /// Where the guest console goes: `stdout`, `none` or a file path.
    #[arg(long, value_name = "stdout|none|PATH", default_value = "stdout")]
    serial_out: String,
    /// Print a machine-readable timing line (JSON, on stderr) when the VM stops: the VMM's
    /// set-up phases, its first `KVM_RUN`, the boot timer, and the guest's boot milestones
    /// as Kindling's init prints them on the console (kernel → userspace → bootstrap).
    #[arg(long)]
    timings: bool,
    /// Run without seccomp filters (for debugging only).
    #[arg(long, conflicts_with = "seccomp_filter")]
    no_seccomp: bool,
    /// Per-thread seccomp filters (seccompiler JSON with `vmm`, `api` and `vcpu` filters)
    /// instead of kindling-vmm's own.
    #[arg(long, value_name = "FILE")]
    seccomp_filter: Option<PathBuf>,
    /// Accepted for Firecracker compatibility: the boot timer is always on.
    #[arg(long)]
    boot_timer: bool,
}

/// `d` in whole microseconds for the timing line (saturating: u64 microseconds span 584,000
/// years).
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The console sink `spec` names; watched for the guest's milestones if `milestones`.
fn serial_out(
    spec: &str,
    milestones: Option<&Milestones>,
    instance_start: Instant,
) -> anyhow::Result<SerialOut> {
    let out: SerialOut = match spec {
        "stdout" => Box::new(std::io::stdout()),
        "none" => Box::new(std::io::sink()),
        path => {
            Box::new(File::create(path).with_context(|| format!("creating serial output {path}"))?)
        }
    };
    Ok(match milestones {
        Some(seen) => Box::new(ConsoleMilestones::new(out, instance_start, seen.clone())),
        None => out,
    })
}

/// Builds and starts the VM (booted or restored); `instance_start` is when the start was
/// asked for.
fn start_vm(
    start: &Start,
    cli: &Cli,
    milestones: &Milestones,
    filters: &Filters,
    instance_start: Instant,
) -> anyhow::Result<RunningVm> {
    let watched = cli.timings.then_some(milestones);
    let serial = serial_out(&cli.serial_out, watched, instance_start)?;
    // Every VM, booted or restored: filtered vCPUs, SIGTERM and SIGINT on the event loop.
    let prepare = |vm: &mut Vm| -> Result<(), VmError> {
        vm.set_seccomp(filters.clone());
        let signals = TermSignals::new(vm.exit().clone(), vm.ctrl_alt_del(), vm.vcpu_control())?;
        vm.add_subscriber(Arc::new(Mutex::new(signals)));
        Ok(())
    };
    Ok(match start {
        Start::Boot(config) => {
            let (mut vm, entry) = build_vm(config, serial)?;
            prepare(&mut vm)?;
            vm.start(entry, instance_start)?
        }
        Start::Restore(params) => restore_vm(params, serial, prepare, instance_start)?,
    })
}

/// Binds the API socket.
fn bind_api(
    api_sock: &Path,
    process_start: Instant,
    timings: &mut serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<UnixListener> {
    let listener = UnixListener::bind(api_sock)
        .with_context(|| format!("binding the API socket {}", api_sock.display()))?;
    timings.insert(
        "process_start_to_api_ready_us".into(),
        micros(process_start.elapsed()).into(),
    );
    Ok(listener)
}

/// Serves the API on its own, filtered thread.
fn spawn_api(listener: UnixListener, state: ApiState, filters: &Filters) -> anyhow::Result<()> {
    let api_filters = filters.clone();
    thread::Builder::new().name("api".into()).spawn(move || {
        // Before the first request: a thread that cannot be filtered serves none.
        match api_filters.apply(ThreadKind::Api) {
            Ok(()) => server::serve(listener, state),
            Err(e) => tracing::error!("API thread: {e}"),
        }
    })?;
    Ok(())
}

/// Serves the API until InstanceStart or a snapshot load succeeds (or a termination signal
/// comes first).
fn start_from_api(
    cli: &Cli,
    milestones: &Milestones,
    filters: &Filters,
    listener: UnixListener,
) -> anyhow::Result<Option<(RunningVm, Instant)>> {
    let (start_tx, start_rx) = mpsc::channel::<StartRequest>();
    spawn_api(listener, ApiState::new(start_tx), filters)?;
    loop {
        match start_rx.recv_timeout(Duration::from_millis(50)) {
            Ok((start, reply)) => {
                let instance_start = Instant::now();
                match start_vm(&start, cli, milestones, filters, instance_start) {
                    Ok(running) => {
                        let _ = reply.send(Ok(running.controls()));
                        return Ok(Some((running, instance_start)));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(format!("{e:#}")));
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) if termination_pending() => return Ok(None),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => bail!("the API thread stopped"),
        }
    }
}

fn read_config(path: &Path) -> anyhow::Result<VmmConfig> {
    let json =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(VmmConfig::from_json(&json)?)
}

fn run(cli: Cli, process_start: Instant) -> anyhow::Result<ExitReason> {
    let mut timings = serde_json::Map::new();
    let milestones = Milestones::default();
    let filters = match (&cli.seccomp_filter, cli.no_seccomp) {
        (Some(path), _) => Filters::from_file(path)?,
        (None, true) => Filters::off(),
        (None, false) => Filters::default_filters()?,
    };
    let started = match (&cli.api_sock, cli.no_api, &cli.config_file) {
        (Some(_), true, _) => bail!("--api-sock and --no-api exclude each other"),
        (None, true, None) => bail!("--no-api needs --config-file"),
        (None, false, _) => bail!("give --api-sock PATH, or --no-api with --config-file FILE"),
        (Some(sock), false, config_file) => {
            let started = bind_api(sock, process_start, &mut timings).and_then(|listener| {
                match config_file {
                    None => start_from_api(&cli, &milestones, &filters, listener),
                    // Booted from the file at once; the API serves the running VM.
                    Some(path) => {
                        let config = read_config(path)?;
                        let instance_start = Instant::now();
                        let start = Start::Boot(config.clone());
                        let running =
                            start_vm(&start, &cli, &milestones, &filters, instance_start)?;
                        let (start_tx, _) = mpsc::channel();
                        let api = ApiState::started(config, running.controls(), start_tx);
                        spawn_api(listener, api, &filters)?;
                        Ok(Some((running, instance_start)))
                    }
                }
            });
            if !matches!(started, Ok(Some(_))) {
                let _ = std::fs::remove_file(sock);
            }
            started?
        }
        (None, true, Some(path)) => {
            let start = Start::Boot(read_config(path)?);
            let instance_start = Instant::now();
            Some((
                start_vm(&start, &cli, &milestones, &filters, instance_start)?,
                instance_start,
            ))
        }
    };
    let Some((running, instance_start)) = started else {
        tracing::info!("termination signal before the VM started");
        return Ok(ExitReason::Stopped);
    };
    let rss = running.vmm_rss_kib().ok();
    // From here the main thread only runs the device event loop and the exit path.
    let filtered = filters.apply(ThreadKind::Vmm);
    if filtered.is_err() {
        running.exit().request(ExitReason::Stopped);
    }
    let (reason, t) = running.wait();
    filtered?;
    if let Some(sock) = &cli.api_sock {
        let _ = std::fs::remove_file(sock);
    }
    tracing::info!("VM stopped: {reason}");
    if cli.timings {
        let us = |d: Option<Duration>| d.map(micros);
        timings.insert(
            "process_start_to_instance_start_us".into(),
            micros(instance_start.duration_since(process_start)).into(),
        );
        timings.insert(
            "instance_start_to_first_kvm_run_us".into(),
            us(t.first_kvm_run).into(),
        );
        timings.insert("boot_timer_us".into(), us(t.boot_timer).into());
        let phases: serde_json::Map<_, _> = metrics::phases()
            .into_iter()
            .map(|(name, took)| (format!("{name}_us"), micros(took).into()))
            .collect();
        timings.insert("setup_phases".into(), phases.into());
        let seen = milestones.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for m in &seen {
            timings.insert(
                format!("instance_start_to_{}_us", m.name),
                micros(m.at).into(),
            );
            timings.insert(format!("guest_{}_s", m.name), m.guest_seconds.into());
        }
        if let [Some(userspace), Some(bootstrap)] = ["userspace", "bootstrap_started"]
            .map(|name| seen.iter().find(|m| m.name == name)?.guest_seconds)
        {
            timings.insert(
                "guest_userspace_to_bootstrap_started_s".into(),
                (bootstrap - userspace).into(),
            );
        }
        timings.insert("vmm_rss_kib_excluding_guest".into(), rss.into());
        timings.insert("exit_reason".into(), reason.to_string().into());
        timings.insert("exit_code".into(), reason.exit_code().into());
        let line = serde_json::json!({ "kindling_vmm_timings": timings });
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
        Ok(reason) => ExitCode::from(reason.exit_code()),
        Err(e) => {
            eprintln!("kindling-vmm: {e:#}");
            ExitCode::from(1)
        }
    }
}
