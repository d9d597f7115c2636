//! `kindling-bootstrap`: the agent inside every execution environment.
//!
//! It fetches the function's configuration from the host, serves the public Lambda Runtime
//! API on `127.0.0.1:9001` and relays every call to the host over vsock (or a Unix socket in
//! the sandbox), as frames on one stream where the host offers it ([`upstream`]), starts and restarts the language runtime, forwards its output as the
//! function log and reports per-invocation metrics. See `kindling_wire` for the host side
//! of the wire.
//!
//! Configuration, all from the environment (init sets the first; tests set the others):
//! - `KINDLING_HOST`: where the host is, `vsock://CID:PORT` (default `vsock://2:9001`) or
//!   `unix:///path` (the sandbox);
//! - `KINDLING_LISTEN`: the local Runtime API, default `127.0.0.1:9001` (`:0` picks a port,
//!   which the runtime is told in `AWS_LAMBDA_RUNTIME_API`);
//! - `KINDLING_TASK_ROOT`, `KINDLING_OPT_ROOT`, `KINDLING_RUNTIME_DIR`: stand-ins for
//!   `/var/task`, `/opt` and `/var/runtime`.
//!
//! The same port serves Lambda's Extensions, Telemetry and Logs APIs: the executables of
//! `/opt/extensions` start before the runtime (see [`extensions`]).
//!
//! On SIGTERM or SIGINT it stops the runtime (SIGTERM, a short grace, SIGKILL), forwards
//! its last log lines and exits 0.

/// The bootstrap's own diagnostics: one line on stderr with a fixed prefix, so they stand
/// apart from the function's output on the guest console.
macro_rules! say {
    ($($arg:tt)*) => { eprintln!("kindling-bootstrap: {}", format_args!($($arg)*)) };
}

mod agent;
mod config;
mod entropy;
mod extensions;
mod logs;
mod memory;
mod network;
mod port;
mod privileges;
mod relay;
mod runtime;
mod telemetry;
mod upstream;

use std::process::ExitCode;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::agent::Agent;
use crate::config::Config;
use crate::extensions::Extensions;
use crate::upstream::Upstream;

fn main() -> ExitCode {
    // The agent's start, for the first invocation's report (its start-up phases).
    let started_ns = kindling_wire::monotonic_ns();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            say!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // Over vsock or a virtio port we are a microVM, whose clock starts from a coarse RTC
    // and drifts.
    let in_microvm = !matches!(config.host, kindling_wire::HostAddr::Unix(_));
    // Capabilities belong to each thread: trimmed before the first other thread exists,
    // every thread the agent ever has is trimmed too.
    if let Err(e) = privileges::keep_only_the_agents(in_microvm) {
        say!("{e}");
        return ExitCode::FAILURE;
    }
    // One thread is plenty for one runtime, and keeps the guest's footprint small.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config, in_microvm, started_ns)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, in_microvm: bool, started_ns: u64) -> Result<(), String> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let api_addr = listener
        .local_addr()
        .map_err(|e| format!("listener address: {e}"))?;

    let upstream = Upstream::new(config.host.clone());
    let function = upstream.environment().await?;
    say!(
        "function {} ({} runtime), host {}, Runtime API on {api_addr}",
        function.function_name,
        function.runtime,
        config.host
    );

    let agent = Arc::new(Agent::new(
        upstream,
        function.clone(),
        in_microvm,
        started_ns,
    ));
    let program = match runtime::locate(&config) {
        Ok(p) => p,
        Err(e) => {
            agent
                .report_init_error("Runtime.InvalidEntrypoint", &e)
                .await;
            return Err(e);
        }
    };
    let spec = runtime::RuntimeSpec {
        program,
        env: runtime::environment(&function, &config, api_addr),
        cwd: config.task_root.clone(),
        runtime_dir: config.runtime_dir.clone(),
        user: config.runtime_user,
    };
    tokio::spawn(relay::serve(listener, agent.clone()));
    // External extensions start, and register, before the runtime.
    Extensions::start_external(&agent, &spec, &config.opt_root.join("extensions")).await;
    runtime::supervise(agent, spec).await
}
