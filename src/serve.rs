//! `kindling serve`, `kindling run` and `kindling logs`: a host serving functions, those
//! of a functions file and those deployed through the control plane.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use kindling_images::{ImagesManifest, Runtime};
use kindling_runtime_api::config::{self, FunctionConfig, Hypervisor};
use kindling_runtime_api::{Credentials, Function, Isolation, Server, ServerOptions};
use tokio::signal::unix::{signal, SignalKind};

use crate::{credentials, environments, images, AddrArg, StateDirArg};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The functions file (see examples/functions.toml). Without one, the server runs
    /// only the functions deployed through its control plane (`aws lambda create-function`).
    #[arg(long, short)]
    functions: Option<PathBuf>,
    /// How functions created through the control plane are isolated: microvm or sandbox
    /// [microvm where a hypervisor can run a guest here, else sandbox].
    #[arg(long, value_name = "ISOLATION")]
    isolation: Option<Isolation>,
    #[command(flatten)]
    events: EventArgs,
    #[command(flatten)]
    common: ServerArgs,
}

/// The durable queue of `Event` invocations.
#[derive(clap::Args, Debug, Default, PartialEq, Eq)]
struct EventArgs {
    /// Event invocations accepted and not yet finished per function, on disk; one more
    /// gets 429 [100].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    event_queue_depth: Option<u64>,
    /// Their payloads' MiB per function [16].
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    event_queue_mib: Option<u64>,
    /// Milliseconds before a failed event's first retry; the second waits twice as long
    /// [60000, Lambda's minute].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    event_retry_base_ms: Option<u64>,
}

impl EventArgs {
    fn apply(&self, options: &mut ServerOptions) {
        if let Some(n) = self.event_queue_depth.and_then(|n| usize::try_from(n).ok()) {
            options.event_queue_depth = n;
        }
        if let Some(mib) = self.event_queue_mib.and_then(|m| usize::try_from(m).ok()) {
            options.event_queue_bytes = mib.saturating_mul(1 << 20);
        }
        if let Some(ms) = self.event_retry_base_ms {
            options.event_retry_base = Duration::from_millis(ms);
        }
    }
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    function: RunFunctionArgs,
    #[command(flatten)]
    common: ServerArgs,
}

/// What `run` makes its one function of.
#[derive(clap::Args)]
struct RunFunctionArgs {
    /// The function's code: a directory (or a Lambda-style .zip).
    code: PathBuf,
    /// The runtime image the function boots.
    #[arg(long, value_parser = images::runtime_parser())]
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
    /// SnapStart: snapshot the microVM once the runtime has initialised, and restore it
    /// for later cold starts instead of booting.
    #[arg(long)]
    snapstart: bool,
    /// outbound (IPv4 and DNS, the default) or none.
    #[arg(long, default_value = "outbound")]
    network: kindling_runtime_api::environment::Network,
    /// A layer (a folder or a Lambda-style .zip), unpacked into /opt after those before
    /// it (repeatable, at most 5).
    #[arg(long = "layer", value_name = "DIR_OR_ZIP")]
    layers: Vec<PathBuf>,
    /// Serve the function over HTTP too (a function URL), on this port (0: a free one,
    /// printed at start).
    #[arg(long, value_name = "PORT", num_args = 0..=1, default_missing_value = "0")]
    url: Option<u16>,
    /// The events its URL sends: 2.0 (function URLs') or 1.0 (API Gateway REST proxy).
    #[arg(long, value_name = "FORMAT", requires = "url", default_value = "2.0")]
    url_payload: kindling_runtime_api::PayloadFormat,
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
    #[command(flatten)]
    freeze: FreezeArgs,
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
    /// Every answered synchronous invoke carries a `Kindling-Hops` header: where its time
    /// went, hop by hop, in µs (caller's body, scheduler, host ↔ agent, runtime, answer).
    #[arg(long)]
    trace_hops: bool,
    #[command(flatten)]
    state: StateDirArg,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    network: NetworkArgs,
    #[command(flatten)]
    identity: IdentityArgs,
}

/// The environments' network.
#[derive(clap::Args, Debug)]
struct NetworkArgs {
    /// Give no environment a network (every function as with network = "none").
    #[arg(long)]
    no_network: bool,
    /// A DNS resolver for environments (repeatable) [the host's upstream resolvers, from
    /// /etc/resolv.conf without loopback stubs].
    #[arg(long = "dns", value_name = "IPV4")]
    dns: Vec<std::net::Ipv4Addr>,
    /// The addresses environments get, a /30 each [10.200.0.0/16].
    #[arg(long, value_name = "CIDR", default_value = kindling_network::DEFAULT_POOL)]
    network_pool: kindling_network::Cidr,
}

impl NetworkArgs {
    /// Sets up the host's side, unless turned off.
    async fn setup(&self) -> Option<std::sync::Arc<kindling_network::Network>> {
        if self.no_network {
            return None;
        }
        let options = kindling_network::NetworkOptions {
            pool: self.network_pool,
            dns: (!self.dns.is_empty()).then(|| self.dns.clone()),
        };
        Some(std::sync::Arc::new(
            kindling_network::Network::setup(options).await,
        ))
    }
}

/// Who the functions are in AWS: their region and account, and their credentials.
#[derive(clap::Args, Debug, Default, PartialEq, Eq)]
struct IdentityArgs {
    /// The region of ARNs and of the functions' AWS_REGION [AWS_REGION, else
    /// AWS_DEFAULT_REGION, else the profile's region, else us-east-1].
    #[arg(long, value_parser = parse_region)]
    region: Option<String>,
    /// The account id in ARNs [000000000000].
    #[arg(long, value_name = "ID", value_parser = parse_account_id)]
    account_id: Option<String>,
    /// Whether functions get this host's AWS credentials (AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), as SAM gives them: host or none; a
    /// function's own `credentials` key overrides it [none].
    #[arg(long, value_name = "HOST_OR_NONE")]
    credentials: Option<Credentials>,
    /// The profile of ~/.aws/credentials and ~/.aws/config the credentials (and region)
    /// come from [without it: the environment's AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY, else $AWS_PROFILE, else default].
    #[arg(long)]
    profile: Option<String>,
}

impl IdentityArgs {
    /// Sets the server's region, account and credentials; looks the credentials up (from
    /// `var`, the environment) when a function gets them or a profile was named, and stops
    /// when one gets them and none are found.
    fn apply(
        &self,
        functions: &[FunctionConfig],
        options: &mut ServerOptions,
        var: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<()> {
        let wanted_by: Vec<&str> = functions
            .iter()
            .map(|f| &f.function)
            .filter(|f| f.credentials.or(self.credentials) == Some(Credentials::Host))
            .map(|f| f.name.as_str())
            .collect();
        let needed = self.credentials == Some(Credentials::Host) || !wanted_by.is_empty();
        let identity = if needed || self.profile.is_some() {
            credentials::find(self.profile.as_deref(), var)?
        } else {
            credentials::Identity::default()
        };
        if needed && identity.credentials.is_none() {
            let who = if wanted_by.is_empty() {
                "--credentials host".to_string()
            } else {
                format!("credentials = \"host\" ({})", wanted_by.join(", "))
            };
            bail!(
                "{who}: no AWS credentials found: set AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, or name a profile of ~/.aws/credentials with --profile"
            );
        }
        if let (true, Some(found)) = (needed, &identity.credentials) {
            eprintln!(
                "kindling: AWS credentials for functions: from {}",
                found.source
            );
        }
        options.region = self
            .region
            .clone()
            .or_else(|| var("AWS_REGION").filter(|r| !r.is_empty()))
            .or_else(|| var("AWS_DEFAULT_REGION").filter(|r| !r.is_empty()))
            .or(identity.profile_region)
            .unwrap_or_else(|| credentials::DEFAULT_REGION.to_string());
        parse_region(&options.region).map_err(anyhow::Error::msg)?;
        if let Some(account) = &self.account_id {
            options.account_id.clone_from(account);
        }
        options.default_credentials = self.credentials.unwrap_or(Credentials::None);
        options.host_credentials = identity.credentials.filter(|_| needed);
        Ok(())
    }
}

/// A region as ARNs spell it (`us-east-1`, `us-gov-west-1`, `eu-central-2`).
fn parse_region(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split('-').collect();
    let letters = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase());
    let ok = parts.len() >= 3
        && parts[0].len() == 2
        && parts[..parts.len() - 1].iter().all(letters)
        && parts[parts.len() - 1].parse::<u8>().is_ok();
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a region (such as us-east-1)"))
    }
}

/// An AWS account id: twelve digits.
fn parse_account_id(s: &str) -> Result<String, String> {
    if s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit()) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not an account id (twelve digits)"))
    }
}

/// When idle environments are frozen.
#[derive(clap::Args, Debug, Default, PartialEq, Eq)]
struct FreezeArgs {
    /// Milliseconds an idle environment, its runtime waiting for an event, may run on
    /// before it is frozen (paused, as Lambda freezes environments) until its next
    /// invocation [100].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    freeze_after_ms: Option<u64>,
    /// Never freeze idle environments: a handler's background work then goes on between
    /// invocations, unlike in Lambda.
    #[arg(long, conflicts_with = "freeze_after_ms")]
    no_freeze: bool,
}

impl FreezeArgs {
    /// Overrides the server's `freeze_after` when a flag was given.
    fn apply(&self, options: &mut ServerOptions) {
        if self.no_freeze {
            options.freeze_after = None;
        } else if let Some(ms) = self.freeze_after_ms {
            options.freeze_after = Some(Duration::from_millis(ms));
        }
    }
}

/// What callers and functions may hold of the host (each flag left out keeps the server's
/// default, given in brackets).
#[derive(clap::Args, Debug, Default, PartialEq, Eq)]
struct LimitArgs {
    /// Seconds a caller has to send a request's head once it has begun [30].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    header_read_timeout: Option<u64>,
    /// Seconds a caller has to send a request's body after its head [60].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    body_read_timeout: Option<u64>,
    /// Seconds an Invoke API connection may rest without a request [120].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    keep_alive_timeout: Option<u64>,
    /// Invoke API connections served at once; one more is answered 503 [1024].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: Option<u64>,
    /// MiB of callers' request bodies held at once over every connection; one more is
    /// answered 429 [256].
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(7..=1_000_000))]
    max_body_memory_mib: Option<u64>,
    /// A function's log file is rotated when it would pass this many MiB [64].
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    log_file_max_mib: Option<u64>,
}

impl LimitArgs {
    /// Overrides the limits given on the command line.
    fn apply(&self, options: &mut ServerOptions) {
        let seconds = |s: Option<u64>, d: &mut Duration| {
            if let Some(s) = s {
                *d = Duration::from_secs(s);
            }
        };
        seconds(self.header_read_timeout, &mut options.header_read_timeout);
        seconds(self.body_read_timeout, &mut options.body_read_timeout);
        seconds(self.keep_alive_timeout, &mut options.keep_alive_timeout);
        if let Some(n) = self.max_connections.and_then(|n| usize::try_from(n).ok()) {
            options.max_connections = n;
        }
        if let Some(mib) = self
            .max_body_memory_mib
            .and_then(|m| usize::try_from(m).ok())
        {
            options.max_body_memory = mib.saturating_mul(1 << 20);
        }
        if let Some(mib) = self.log_file_max_mib {
            options.log_file_max_bytes = mib.saturating_mul(1 << 20);
        }
    }
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
    let functions = match &args.functions {
        Some(file) => load_functions(file)?,
        None => Vec::new(),
    };
    let api = ApiDefaults {
        isolation: args.isolation,
        events: args.events,
    };
    host(functions, args.common, api).await
}

/// What `serve` adds to the server `run` starts too: the control plane's default
/// isolation and the event queue's settings.
#[derive(Default)]
struct ApiDefaults {
    isolation: Option<Isolation>,
    events: EventArgs,
}

/// The functions of a functions.toml, whose runtimes must be ones this host has images for.
fn load_functions(path: &Path) -> anyhow::Result<Vec<FunctionConfig>> {
    let runtimes = Runtime::ALL.map(Runtime::name);
    Ok(config::load(path, &runtimes)?)
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let function = run_function(args.function)?;
    host(vec![function], args.common, ApiDefaults::default()).await
}

/// `run`'s one function, as a functions.toml would give it; checked as one would be.
fn run_function(args: RunFunctionArgs) -> anyhow::Result<FunctionConfig> {
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
    let layers = args
        .layers
        .iter()
        .map(|l| std::fs::canonicalize(l).with_context(|| format!("--layer {}", l.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let isolation = args.isolation.unwrap_or(Isolation::MicroVm);
    if args.snapstart && isolation == Isolation::Sandbox {
        bail!("--snapstart snapshots a microVM; --isolation sandbox has none");
    }
    let function = Function {
        name,
        code,
        runtime: args.runtime.name().to_string(),
        handler: args.handler,
        memory_mb: args.memory,
        timeout: Duration::from_secs(args.timeout.into()),
        isolation,
        max_concurrency: args.max_concurrency,
        env: args.env.into_iter().collect::<BTreeMap<_, _>>(),
        snapstart: args.snapstart,
        network: args.network,
        layers,
        credentials: None,
    };
    Ok(FunctionConfig {
        function,
        hypervisor: None,
        event_invoke: None,
        url: args.url.map(|port| kindling_runtime_api::UrlConfig {
            port,
            payload: args.url_payload,
        }),
    })
}

/// Starts the host for `functions`, prints their logs, and serves until SIGINT/SIGTERM.
async fn host(
    functions: Vec<FunctionConfig>,
    args: ServerArgs,
    api: ApiDefaults,
) -> anyhow::Result<ExitCode> {
    check_exposure(args.addr.addr, args.allow_remote)?;
    raise_fd_limit();
    let state_dir = args.state.state_dir;
    let images = args
        .images
        .as_deref()
        .map(ImagesManifest::load)
        .transpose()?;
    let event_invoke = functions
        .iter()
        .filter_map(|f| Some((f.function.name.clone(), f.event_invoke.clone()?)))
        .collect();
    // Before anything is built: a server that cannot give its functions the identity
    // they ask for stops at once.
    let mut options = ServerOptions::new(&state_dir);
    args.identity
        .apply(&functions, &mut options, &|name| std::env::var(name).ok())?;
    let function_urls = functions
        .iter()
        .filter_map(|f| Some((f.function.name.clone(), f.url?)))
        .collect();
    let environments::Prepared {
        functions,
        launchers,
        deployer,
        default_isolation,
    } = environments::prepare(
        functions,
        args.hypervisor,
        images,
        &state_dir,
        api.isolation,
        args.network.setup().await,
    )?;
    options.deployer = Some(deployer);
    options.event_invoke = event_invoke;
    options.function_urls = function_urls;
    options.default_isolation = default_isolation;
    api.events.apply(&mut options);
    options.invoke_addr = args.addr.addr;
    options.idle_timeout = Duration::from_secs(args.idle_timeout);
    args.freeze.apply(&mut options);
    options.init_timeout = Duration::from_secs(args.init_timeout);
    args.limits.apply(&mut options);
    options.trace_hops = args.trace_hops;
    let names: Vec<String> = functions.iter().map(|f| f.name.clone()).collect();
    let server = Server::bind(functions, launchers, options).await?;
    let mut logs = server.logs();
    let printer = tokio::spawn(async move {
        use tokio::sync::broadcast::error::{RecvError, TryRecvError};
        let mut text = String::new();
        loop {
            match logs.recv().await {
                Ok(line) => push_log_line(&mut text, &line),
                // Lines missed by a slow terminal are still in the log files.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => break,
            }
            // Lines that came together (an invocation's END and REPORT) go out in one
            // write, not one each.
            loop {
                match logs.try_recv() {
                    Ok(line) => push_log_line(&mut text, &line),
                    Err(TryRecvError::Lagged(_)) => continue,
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                }
            }
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            text.clear();
        }
    });
    // Before the line that says the server is up, so that whoever waits for it has both.
    for (name, addr) in server.function_urls() {
        eprintln!("function URL {name} http://{addr}/");
    }
    eprintln!(
        "kindling: serving {} on http://{}",
        if names.is_empty() {
            "the functions deployed through the API".to_string()
        } else {
            names.join(", ")
        },
        server.local_addr()
    );
    match names.first() {
        Some(name) => eprintln!("kindling: try `kindling invoke {name} --payload '{{}}'`"),
        None => eprintln!(
            "kindling: try `aws lambda list-functions --endpoint-url http://{}`",
            server.local_addr()
        ),
    }
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

/// One live log line as `serve` prints it: `function | text`.
fn push_log_line(text: &mut String, line: &kindling_runtime_api::logs::LogLine) {
    text.push_str(&line.function);
    text.push_str(" | ");
    text.push_str(&line.text);
    text.push('\n');
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
    use crate::{Cli, Command};
    use clap::error::ErrorKind;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        let argv = std::iter::once("kindling").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|cli| cli.command)
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(&[&["run"][..], args].concat()) {
            Ok(Command::Run(args)) => args,
            Ok(_) => panic!("{args:?} parsed as another command"),
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    fn refused(args: &[&str]) -> clap::Error {
        match parse(args) {
            Ok(_) => panic!("{args:?} was accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn serve_takes_a_functions_file_and_an_images_manifest() {
        let Ok(Command::Serve(args)) = parse(&[
            "serve",
            "-f",
            "functions.toml",
            "--images",
            "images.json",
            "--init-timeout",
            "900",
        ]) else {
            panic!("not serve");
        };
        assert_eq!(args.functions.as_deref(), Some(Path::new("functions.toml")));
        assert_eq!(
            args.common.images.as_deref(),
            Some(Path::new("images.json"))
        );
        assert_eq!(args.common.init_timeout, 900);
        assert_eq!(args.common.idle_timeout, 300);
        assert!(!args.common.allow_remote);
        assert_eq!(args.common.freeze, FreezeArgs::default());
        let Ok(Command::Serve(bare)) = parse(&["serve", "--isolation", "sandbox"]) else {
            panic!("serve without a functions file");
        };
        assert_eq!(bare.functions, None);
        assert_eq!(bare.isolation, Some(Isolation::Sandbox));
        for out_of_range in ["0", "901"] {
            let err = refused(&["serve", "-f", "f", "--init-timeout", out_of_range]);
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{out_of_range}");
        }
    }

    #[test]
    fn freezing_can_be_delayed_or_turned_off() {
        // The default the help text gives is the server's.
        let default = ServerOptions::new("/state").freeze_after;
        assert_eq!(default, Some(Duration::from_millis(100)));
        let freeze_after = |flags: &[&str]| {
            let Ok(Command::Serve(args)) = parse(&[&["serve", "-f", "f"], flags].concat()) else {
                panic!("not serve: {flags:?}");
            };
            let mut options = ServerOptions::new("/state");
            args.common.freeze.apply(&mut options);
            options.freeze_after
        };
        assert_eq!(freeze_after(&[]), default);
        assert_eq!(
            freeze_after(&["--freeze-after-ms", "0"]),
            Some(Duration::ZERO)
        );
        assert_eq!(freeze_after(&["--no-freeze"]), None);
        let both = refused(&["serve", "-f", "f", "--no-freeze", "--freeze-after-ms", "5"]);
        assert_eq!(both.kind(), ErrorKind::ArgumentConflict);
    }

    #[test]
    fn limit_flags_override_only_what_they_name() {
        let Ok(Command::Serve(args)) = parse(&[
            "serve",
            "-f",
            "f",
            "--header-read-timeout",
            "5",
            "--max-connections",
            "64",
            "--log-file-max-mib",
            "2",
            "--max-body-memory-mib",
            "32",
        ]) else {
            panic!("not serve");
        };
        let defaults = ServerOptions::new("/state");
        let mut options = ServerOptions::new("/state");
        args.common.limits.apply(&mut options);
        assert_eq!(options.header_read_timeout, Duration::from_secs(5));
        assert_eq!(options.max_connections, 64);
        assert_eq!(options.log_file_max_bytes, 2 << 20);
        assert_eq!(options.max_body_memory, 32 << 20);
        assert_eq!(options.body_read_timeout, defaults.body_read_timeout);
        assert_eq!(options.keep_alive_timeout, defaults.keep_alive_timeout);
        // The defaults the help text gives are the server's.
        assert_eq!(defaults.header_read_timeout, Duration::from_secs(30));
        assert_eq!(defaults.body_read_timeout, Duration::from_secs(60));
        assert_eq!(defaults.keep_alive_timeout, Duration::from_secs(120));
        assert_eq!(defaults.max_connections, 1024);
        assert_eq!(defaults.max_body_memory, 256 << 20);
        assert_eq!(defaults.log_file_max_bytes, 64 << 20);
        for zero in ["--body-read-timeout", "--max-connections"] {
            let err = refused(&["serve", "-f", "f", zero, "0"]);
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{zero}");
        }
        let Ok(Command::Run(run)) = parse(&[
            "run",
            "code",
            "--runtime",
            "python",
            "--handler",
            "h",
            "--keep-alive-timeout",
            "9",
        ]) else {
            panic!("not run");
        };
        assert_eq!(run.common.limits.keep_alive_timeout, Some(9));
    }

    #[test]
    fn region_account_and_credentials_come_from_flags_environment_and_profile() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".aws")).unwrap();
        std::fs::write(
            home.path().join(".aws/config"),
            "[profile dev]\nregion = eu-north-1\naws_access_key_id = AKIDDEV\naws_secret_access_key = s\n",
        )
        .unwrap();
        let home_dir = home.path().display().to_string();
        let identity = |flags: &[&str]| {
            let Ok(Command::Serve(args)) = parse(&[&["serve"], flags].concat()) else {
                panic!("not serve: {flags:?}");
            };
            args.common.identity
        };
        let apply = |flags: &[&str], vars: &[(&str, &str)]| {
            let mut vars: BTreeMap<String, String> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            vars.insert("HOME".into(), home_dir.clone());
            let mut options = ServerOptions::new("/state");
            identity(flags)
                .apply(&[], &mut options, &|k| vars.get(k).cloned())
                .map(|()| options)
        };
        let options = apply(&[], &[]).unwrap();
        assert_eq!(
            (options.region.as_str(), options.account_id.as_str()),
            ("us-east-1", "000000000000")
        );
        assert_eq!(options.default_credentials, Credentials::None);
        assert!(options.host_credentials.is_none());
        let options = apply(&[], &[("AWS_DEFAULT_REGION", "eu-west-1")]).unwrap();
        assert_eq!(options.region, "eu-west-1");
        let vars = [
            ("AWS_REGION", "eu-west-2"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
        ];
        assert_eq!(apply(&[], &vars).unwrap().region, "eu-west-2");
        let options = apply(
            &["--region", "sa-east-1", "--account-id", "123456789012"],
            &vars,
        )
        .unwrap();
        assert_eq!(options.region, "sa-east-1");
        assert_eq!(options.account_id, "123456789012");
        // A profile brings its region and, when functions get them, its keys.
        let options = apply(&["--profile", "dev", "--credentials", "host"], &[]).unwrap();
        assert_eq!(options.region, "eu-north-1");
        assert_eq!(options.default_credentials, Credentials::Host);
        assert_eq!(options.host_credentials.unwrap().access_key_id, "AKIDDEV");
        let options = apply(&["--profile", "dev"], &[]).unwrap();
        assert!(options.host_credentials.is_none(), "no function gets them");
        let err = apply(&["--credentials", "host"], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--credentials host: no AWS credentials found"),
            "{err}"
        );
        let err = apply(&[], &[("AWS_REGION", "Mars")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"Mars\" is not a region"), "{err}");
        for bad in [&["--region", "us_east_1"][..], &["--account-id", "12345"]] {
            let err = refused(&[&["serve"], bad].concat());
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad:?}");
        }
    }

    #[test]
    fn event_queue_flags_override_the_servers_defaults() {
        let Ok(Command::Serve(args)) = parse(&[
            "serve",
            "--event-queue-depth",
            "1000",
            "--event-retry-base-ms",
            "50",
        ]) else {
            panic!("not serve");
        };
        let defaults = ServerOptions::new("/state");
        let mut options = ServerOptions::new("/state");
        args.events.apply(&mut options);
        assert_eq!(options.event_queue_depth, 1000);
        assert_eq!(options.event_retry_base, Duration::from_millis(50));
        assert_eq!(options.event_queue_bytes, defaults.event_queue_bytes);
        // The defaults the help text gives are the server's (Lambda's minute).
        assert_eq!(defaults.event_queue_depth, 100);
        assert_eq!(defaults.event_queue_bytes, 16 << 20);
        assert_eq!(defaults.event_retry_base, Duration::from_secs(60));
        let err = refused(&["serve", "--event-queue-depth", "0"]);
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn run_takes_a_runtime_by_name_and_defaults_like_lambda() {
        let args = run_args(&["code", "--runtime", "python", "--handler", "app.handler"]);
        let f = args.function;
        assert_eq!(f.code, Path::new("code"));
        assert_eq!(f.runtime, Runtime::Python);
        assert_eq!(f.handler, "app.handler");
        assert_eq!((f.memory, f.timeout), (128, 3));
        assert_eq!(f.max_concurrency, config::DEFAULT_MAX_CONCURRENCY);
        assert_eq!((f.name, f.isolation), (None, None));
        let args = run_args(&[
            "code",
            "--runtime",
            "provided-debian",
            "--handler",
            "h",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--isolation",
            "sandbox",
        ]);
        assert_eq!(args.function.runtime, Runtime::ProvidedDebian);
        assert_eq!(
            args.function.env,
            [
                ("A".to_string(), "1".to_string()),
                ("B".to_string(), "x=y".to_string())
            ]
        );
        assert_eq!(args.function.isolation, Some(Isolation::Sandbox));
    }

    #[test]
    fn run_refuses_an_unknown_runtime_naming_the_known_ones() {
        let err = refused(&["run", "code", "--runtime", "ruby", "--handler", "h"]);
        assert_eq!(err.kind(), ErrorKind::InvalidValue);
        let text = err.to_string();
        assert!(
            text.contains("invalid value 'ruby' for '--runtime <RUNTIME>'"),
            "{text}"
        );
        assert!(
            text.contains("[possible values: provided, provided-debian, python, node]"),
            "{text}"
        );
        let err = refused(&["run", "code", "--handler", "h"]);
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
        assert!(err.to_string().contains("--runtime <RUNTIME>"), "{err}");
        let err = refused(&[
            "run",
            "code",
            "--runtime",
            "node",
            "--handler",
            "h",
            "--env",
            "A",
        ]);
        assert!(
            err.to_string().contains("\"A\": expected KEY=VALUE"),
            "{err}"
        );
    }

    #[test]
    fn run_names_the_function_after_its_code_and_checks_lambdas_limits() {
        let dir = tempfile::tempdir().unwrap();
        let code = dir.path().join("hello-fn");
        std::fs::create_dir(&code).unwrap();
        let zip = dir.path().join("bundle.zip");
        std::fs::write(&zip, b"").unwrap();
        let function = |extra: &[&str]| {
            let base = ["--runtime", "python", "--handler", "app.handler"];
            run_function(run_args(&[&base[..], extra].concat()).function)
        };
        let named = function(&[code.to_str().unwrap()]).unwrap();
        assert_eq!(named.function.name, "hello-fn");
        assert_eq!(named.function.code, code.canonicalize().unwrap());
        assert_eq!(named.function.runtime, "python");
        assert_eq!(named.function.isolation, Isolation::MicroVm);
        assert_eq!(named.hypervisor, None);
        let zipped = function(&[zip.to_str().unwrap()]).unwrap();
        assert_eq!(zipped.function.name, "bundle");
        let renamed = function(&[code.to_str().unwrap(), "--name", "other"]).unwrap();
        assert_eq!(renamed.function.name, "other");
        let err = function(&[code.to_str().unwrap(), "--memory", "64"]).unwrap_err();
        assert!(
            err.to_string().starts_with("--memory 64: must be within"),
            "{err}"
        );
        let err = function(&[code.to_str().unwrap(), "--timeout", "901"]).unwrap_err();
        assert!(
            err.to_string().starts_with("--timeout 901: must be within"),
            "{err}"
        );
        let missing = dir.path().join("missing");
        let err = function(&[missing.to_str().unwrap()]).unwrap_err();
        assert!(format!("{err:#}").contains("missing"), "{err:#}");
    }

    #[test]
    fn the_example_functions_file_loads_with_this_hosts_runtimes() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/functions.toml");
        let functions = load_functions(&example).unwrap();
        let runtimes: BTreeMap<&str, &str> = functions
            .iter()
            .map(|f| (f.function.name.as_str(), f.function.runtime.as_str()))
            .collect();
        assert_eq!(runtimes["hello"], "python");
        assert_eq!(runtimes["echo"], "provided-debian");
        assert_eq!(runtimes["hello-node"], "node");
    }

    #[test]
    fn a_functions_file_with_an_unknown_runtime_is_refused_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("code")).unwrap();
        let file = dir.path().join("functions.toml");
        std::fs::write(
            &file,
            "[functions.a]\ncode = 'code'\nhandler = 'h'\nruntime = 'ruby'\n",
        )
        .unwrap();
        let err = load_functions(&file).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}:4: functions.a.runtime: \"ruby\" is not one of \"provided\", \"provided-debian\", \"python\", \"node\"",
                file.display()
            )
        );
    }

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
