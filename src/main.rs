//! `kindling`: run serverless functions in microVMs (or namespace sandboxes), Lambda-style.

mod bench;
mod credentials;
mod environments;
mod images;
mod invoke;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kindling",
    version,
    about = "Run serverless functions in microVMs, the way Lambda does"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the functions of a functions.toml on the Lambda Invoke API.
    Serve(serve::ServeArgs),
    /// Serve one function from a code directory, like Lambda's runtime interface emulator;
    /// prints its log (START/END/REPORT lines) as invocations happen.
    Run(serve::RunArgs),
    /// Invoke a function on a running server and print its response.
    Invoke(invoke::InvokeArgs),
    /// Print a function's log (and, with --console, its guests' consoles).
    Logs(serve::LogsArgs),
    /// Build, list and prune guest kernels, initramfs and root images.
    #[command(subcommand)]
    Images(images::ImagesCommand),
    /// Measure warm and cold invokes, throughput and hypervisor memory; print one table.
    Bench(bench::BenchArgs),
}

/// Where the Invoke API listens by default (Lambda's emulator uses the same port).
pub const DEFAULT_ADDR: &str = "127.0.0.1:9000";

/// `--addr`, shared by every command that talks to or starts a server.
#[derive(clap::Args, Clone, Debug)]
pub struct AddrArg {
    /// The Invoke API's address.
    #[arg(long, env = "KINDLING_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: SocketAddr,
}

/// `--state-dir`, where a server keeps environments, sockets and logs.
#[derive(clap::Args, Clone, Debug)]
pub struct StateDirArg {
    /// Folder for environments, sockets and logs (keep it short: Unix socket paths are).
    #[arg(long, env = "KINDLING_STATE_DIR", default_value = "/run/kindling")]
    pub state_dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The bench draws progress bars on stderr: only warnings may interrupt them.
    let default_filter = match cli.command {
        Command::Bench(_) => "warn",
        _ => "kindling=info,warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KINDLING_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Images(cmd) => cmd.run().map(|()| ExitCode::SUCCESS),
        Command::Logs(args) => serve::logs(args),
        Command::Serve(args) => block_on(serve::serve(args)),
        Command::Run(args) => block_on(serve::run(args)),
        Command::Invoke(args) => block_on(invoke::invoke(args)),
        Command::Bench(args) => block_on(bench::bench(args)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kindling: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn block_on(
    work: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Runtime::new()?.block_on(work)
}
