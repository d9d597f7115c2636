//! `kindling serve`, `kindling run` and `kindling logs`: a host serving functions.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use kindling_images::{ImagesManifest, Runtime};
use kindling_runtime_api::config::{self, FunctionConfig, Hypervisor};
use kindling_runtime_api::{Function, Isolation, Server, ServerOptions};
use tokio::signal::unix::{signal, SignalKind};

use crate::{environments, AddrArg, StateDirArg};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The functions file (see examples/functions.toml).
    #[arg(long, short)]
    functions: PathBuf,
    #[command(flatten)]
    common: ServerArgs,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// The function's code: a directory (or a Lambda-style .zip).
    code: PathBuf,
    /// The runtime image the function boots.
    #[arg(long, value_enum)]
    runtime: Runtime,
    /// The handler, e.g. app.handler.
    #[arg(long)]
    handler: String,
    /// The function's name (default: the code's folder name).
    #[arg(long)]
    name: Option<String>,
    /// Memory in MB (128..10240).
    #[arg(long, default_value_t = 128)]
    memory: u32,
    /// Timeout in seconds (1..900).
    #[arg(long, default_value_t = 3)]
    timeout: u32,
    /// Environments at most at once.
    #[arg(long, default_value_t = config::DEFAULT_MAX_CONCURRENCY)]
    max_concurrency: usize,
    /// A variable for the function, KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// microvm (default) or sandbox.
    #[arg(long)]
    isolation: Option<Isolation>,
    #[command(flatten)]
    common: ServerArgs,
}

/// What `serve` and `run` share.
#[derive(clap::Args)]
struct ServerArgs {
    /// The microVM hypervisor for every microvm function: kindling (KVM) or qemu.
    /// Default: kindling where this host's KVM can boot a guest kernel, else qemu.
    #[arg(long)]
    hypervisor: Option<Hypervisor>,
    /// Stop an environment after it has been idle this many seconds.
    #[arg(long, default_value_t = 300)]
    idle_timeout: u64,
    /// Boot the kernel, initramfs and root images named by this manifest (written by
    /// `kindling images build --manifest FILE`) instead of looking them up in the image
    /// cache: for hosts without Debian's build tools.
    #[arg(long, value_name = "FILE", env = "KINDLING_IMAGES")]
    images: Option<PathBuf>,
    /// Seconds a new environment has to boot and reach its first `/next` before the
    /// invocation fails with Runtime.InitTimeout (Lambda's init phase limit is 10 s; raise
    /// it only where guests run emulated).
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=900))]
    init_timeout: u64,
    #[command(flatten)]
    addr: AddrArg,
    /// Serve the Invoke API on an address other hosts can reach. It has no authentication:
    /// anyone who reaches it can invoke every function.
    #[arg(long)]
    allow_remote: bool,
    #[command(flatten)]
    state: StateDirArg,
}

/// Raises the soft limit on open files to the hard one: a server holds a socket per caller
/// connection (up to the Invoke API's cap of 1024) besides its environments' sockets and
/// logs, more than the usual soft limit of 1024 allows.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                eprintln!(
                    "kindling: warning: cannot raise the open-files limit {soft} to {hard}: {e}"
                );
            }
        }
        Ok(_) => {}
        Err(e) => eprintln!("kindling: warning: cannot read the open-files limit: {e}"),
    }
}

/// Refuses an Invoke API address off this host unless `allowed`, and warns when it is.
fn check_exposure(addr: SocketAddr, allowed: bool) -> anyhow::Result<()> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    if !allowed {
        bail!(
            "--addr {addr} is reachable from other hosts and the Invoke API has no authentication; \
             pass --allow-remote to serve there anyway"
        );
    }
    eprintln!(
        "kindling: warning: the Invoke API on {addr} has no authentication: anyone who reaches it can invoke every function"
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct LogsArgs {
    /// The function's name.
    function: String,
    /// Print its guests' console output instead.
    #[arg(long)]
    console: bool,
    #[command(flatten)]
    state: StateDirArg,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let runtimes = Runtime::ALL.map(Runtime::name);
    let functions = config::load(&args.functions, &runtimes)?;
    host(functions, args.common).await
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let code =
        std::fs::canonicalize(&args.code).with_context(|| format!("{}", args.code.display()))?;
    let name = match args.name {
        Some(name) => name,
        None => code
            .file_stem()
            .and_then(|n| n.to_str())
            .context("cannot name the function after its code folder: give --name")?
            .to_string(),
    };
    if !config::MEMORY_MB.contains(&args.memory) {
        bail!(
            "--memory {}: must be within {:?} MB",
            args.memory,
            config::MEMORY_MB
        );
    }
    if !config::TIMEOUT_S.contains(&args.timeout) {
        bail!(
            "--timeout {}: must be within {:?} s",
            args.timeout,
            config::TIMEOUT_S
        );
    }
    let function = Function {
        name,
        code,
        runtime: args.runtime.name().to_string(),
        handler: args.handler,
        memory_mb: args.memory,
        timeout: Duration::from_secs(args.timeout.into()),
        isolation: args.isolation.unwrap_or(Isolation::MicroVm),
        max_concurrency: args.max_concurrency,
        env: args.env.into_iter().collect::<BTreeMap<_, _>>(),
    };
    host(
        vec![FunctionConfig {
            function,
            hypervisor: None,
        }],
        args.common,
    )
    .await
}

/// Starts the host for `functions`, prints their logs, and serves until SIGINT/SIGTERM.
async fn host(functions: Vec<FunctionConfig>, args: ServerArgs) -> anyhow::Result<ExitCode> {
    check_exposure(args.addr.addr, args.allow_remote)?;
    raise_fd_limit();
    let state_dir = args.state.state_dir;
    let images = args
        .images
        .as_deref()
        .map(ImagesManifest::load)
        .transpose()?;
    let (functions, launchers) =
        environments::prepare(functions, args.hypervisor, images, &state_dir)?;
    let mut options = ServerOptions::new(&state_dir);
    options.invoke_addr = args.addr.addr;
    options.idle_timeout = Duration::from_secs(args.idle_timeout);
    options.init_timeout = Duration::from_secs(args.init_timeout);
    let names: Vec<String> = functions.iter().map(|f| f.name.clone()).collect();
    let server = Server::bind(functions, launchers, options).await?;
    let mut logs = server.logs();
    let printer = tokio::spawn(async move {
        while let Ok(line) = logs.recv().await {
            println!("{} | {}", line.function, line.text);
        }
    });
    eprintln!(
        "kindling: serving {} on http://{}",
        names.join(", "),
        server.local_addr()
    );
    eprintln!(
        "kindling: try `kindling invoke {} --payload '{{}}'`",
        names[0]
    );
    let mut term = signal(SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    server.run(stop).await?;
    printer.abort();
    Ok(ExitCode::SUCCESS)
}

pub fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let state = &args.state.state_dir;
    let mut out = std::io::stdout().lock();
    if !args.console {
        function_log(state, &args.function, &mut out)?;
        return Ok(ExitCode::SUCCESS);
    }
    // Consoles of stopped environments are kept in one file; running ones are read live.
    let kept = state
        .join("logs")
        .join(format!("{}.console.log", args.function));
    let mut found = false;
    if let Ok(text) = std::fs::read(&kept) {
        out.write_all(&text)?;
        found = true;
    }
    let prefix = format!("{}-", args.function);
    let mut live: Vec<_> = std::fs::read_dir(state.join("envs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| is_env_of(n, &prefix))
        })
        .map(|e| e.path())
        .collect();
    live.sort();
    for env in live {
        if let Ok(text) = std::fs::read(env.join("console.log")) {
            let id = env
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            writeln!(out, "=== environment {id} (running) ===")?;
            out.write_all(&text)?;
            found = true;
        }
    }
    if !found {
        bail!(
            "no guest console for {:?} under {}",
            args.function,
            state.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Copies the log of `function` to `out`: the file rotated last (`<name>.log.1`, if any,
/// with the older lines), then the current one (`<name>.log`).
fn function_log(state: &Path, function: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let path = state.join("logs").join(format!("{function}.log"));
    let rotated = state.join("logs").join(format!("{function}.log.1"));
    let mut found = false;
    for file in [&rotated, &path] {
        match std::fs::File::open(file) {
            Ok(mut f) => {
                std::io::copy(&mut f, out)
                    .with_context(|| format!("reading {}", file.display()))?;
                found = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| file.display().to_string()),
        }
    }
    if !found {
        bail!("no log for {function:?} at {}", path.display());
    }
    Ok(())
}

/// Environment folders are `<function>-<pid>-<n>`; a function named `a` must not claim
/// those of a function named `a-b`.
fn is_env_of(folder: &str, prefix: &str) -> bool {
    folder.strip_prefix(prefix).is_some_and(|rest| {
        let parts: Vec<&str> = rest.split('-').collect();
        parts.len() == 2 && parts.iter().all(|p| p.parse::<u64>().is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_reads_the_rotated_file_then_the_current_one() {
        let state = tempfile::tempdir().unwrap();
        let logs = state.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        let mut out = Vec::new();
        let err = function_log(state.path(), "f", &mut out).unwrap_err();
        assert!(err.to_string().contains("no log for \"f\""), "{err}");
        std::fs::write(logs.join("f.log"), "new\n").unwrap();
        function_log(state.path(), "f", &mut out).unwrap();
        assert_eq!(out, b"new\n");
        std::fs::write(logs.join("f.log.1"), "old\n").unwrap();
        out.clear();
        function_log(state.path(), "f", &mut out).unwrap();
        assert_eq!(out, b"old\nnew\n");
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_one() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // Lowering the soft limit is always allowed; raising it back is what is tested.
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(4096) / 2, hard).unwrap();
        raise_fd_limit();
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
    }

    #[test]
    fn only_loopback_is_served_without_allow_remote() {
        for local in ["127.0.0.1:9000", "[::1]:9000", "127.1.2.3:0"] {
            check_exposure(local.parse().unwrap(), false).unwrap();
        }
        for remote in ["0.0.0.0:9000", "[::]:9000", "192.0.2.7:9000"] {
            let addr = remote.parse().unwrap();
            let err = check_exposure(addr, false).unwrap_err().to_string();
            assert!(err.contains("--allow-remote"), "{err}");
            check_exposure(addr, true).unwrap();
        }
    }
}
