//! One run against one kind of environment: a fresh in-process server (so that its first
//! invocation is a cold start), then warm invokes on kept-alive connections, one client
//! and then [`CLIENTS`] at once, and the hypervisors' memory while their VMs run.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use indicatif::ProgressBar;
use kindling_microvm::probe;
use kindling_microvm::qemu::{QEMU, VHOST_VSOCK};
use kindling_runtime_api::client::{Client, InvokeOptions, InvokeResponse};
use kindling_runtime_api::config::{FunctionConfig, Hypervisor};
use kindling_runtime_api::hops::{self, HEADER_HOPS};
use kindling_runtime_api::logs::LogLine;
use kindling_runtime_api::{Function, Isolation, Server, ServerOptions};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinSet;

use super::cpu::{CpuSample, CpuSpent, Held};
use super::interrupt::Interrupt;
use super::report;
use super::rss::{self, ProgramRss};
use super::stats::median;
use crate::environments;

/// The bench function's name.
pub const FUNCTION: &str = "bench-noop";
/// Concurrent clients (and so environments) of the concurrent throughput.
pub const CLIENTS: usize = 4;
/// Untimed invokes before the timed ones, so that lazy set-up is not measured.
const WARM_UP: usize = 10;
/// The bench function's memory, and so its guests' RAM (the launcher's minimum).
const MEMORY_MIB: u32 = 128;
/// Inside the nested-KVM harness, where [`CLIENTS`] guests booting at once share one
/// emulated CPU and each takes tens of seconds.
const NESTED_INIT_TIMEOUT: Duration = Duration::from_secs(900);
/// Patient limits: under emulation a guest boots in seconds, not milliseconds.
const INIT_TIMEOUT: Duration = Duration::from_secs(120);
const FUNCTION_TIMEOUT_S: u64 = 60;

/// What is measured: the sandbox, or microVMs on one hypervisor, running one of the
/// bench's no-op functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub isolation: Isolation,
    /// `Some` exactly for microVMs.
    pub hypervisor: Option<Hypervisor>,
    pub runtime: NoOp,
}

/// The bench's no-op functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoOp {
    /// A python handler that returns `None` (`examples/bench-noop`).
    Python,
    /// A `provided` function: the static `lambda_runtime` binary of
    /// `tests/lambda-rs-runtime`, answering `null` (`KINDLING_TEST_NOOP`).
    Provided,
}

/// The `provided` no-op's program, as `scripts/build-guest.sh` leaves it beside the guest
/// binaries.
pub const PROVIDED_BOOTSTRAP: &str = "bootstrap";

impl Target {
    pub const SANDBOX: Target = Target {
        isolation: Isolation::Sandbox,
        hypervisor: None,
        runtime: NoOp::Python,
    };
    pub const SANDBOX_PROVIDED: Target = Target {
        isolation: Isolation::Sandbox,
        hypervisor: None,
        runtime: NoOp::Provided,
    };

    pub fn microvm(hypervisor: Hypervisor) -> Self {
        Target {
            isolation: Isolation::MicroVm,
            hypervisor: Some(hypervisor),
            runtime: NoOp::Python,
        }
    }

    /// Whether its guests run under instruction emulation (QEMU TCG) on this host.
    pub fn emulated(&self) -> bool {
        self.hypervisor == Some(Hypervisor::Qemu) && !probe::kvm().can_boot_linux
    }

    /// The environment column of the table.
    pub fn label(&self) -> &'static str {
        match (self.hypervisor, nested()) {
            (None, _) if self.runtime == NoOp::Provided => "sandbox provided",
            (None, _) => "sandbox python",
            (Some(Hypervisor::Kindling), false) => "microVM kindling-vmm",
            (Some(Hypervisor::Kindling), true) => "microVM kindling-vmm (nested)",
            (Some(Hypervisor::Qemu), _) if self.emulated() => "microVM qemu/tcg",
            (Some(Hypervisor::Qemu), false) => "microVM qemu/kvm",
            (Some(Hypervisor::Qemu), true) => "microVM qemu/kvm (nested)",
        }
    }

    /// Whether its environments can be restored from snapshots (SnapStart); why not.
    pub fn snapstart(&self) -> Result<(), String> {
        match self.hypervisor {
            None => Err("the sandbox has no VM to snapshot".into()),
            Some(Hypervisor::Kindling | Hypervisor::Qemu) => Ok(()),
        }
    }

    /// The programs one running VM consists of: the hypervisor first, then its helpers.
    pub fn hypervisor_programs(&self) -> &'static [&'static str] {
        match self.hypervisor {
            None => &[],
            Some(Hypervisor::Kindling) => &["kindling-vmm"],
            Some(Hypervisor::Qemu) => &[QEMU, VHOST_VSOCK],
        }
    }

    fn function(&self, setup: &Setup) -> FunctionConfig {
        let (code, runtime, handler, env) = match self.runtime {
            NoOp::Python => (&setup.code, "python", "app.handler", BTreeMap::new()),
            NoOp::Provided => (
                &setup.provided_code,
                "provided",
                "noop",
                BTreeMap::from([("KINDLING_TEST_NOOP".to_string(), "1".to_string())]),
            ),
        };
        FunctionConfig {
            function: Function {
                name: FUNCTION.to_string(),
                code: code.clone(),
                runtime: runtime.to_string(),
                handler: handler.to_string(),
                memory_mb: MEMORY_MIB,
                timeout: Duration::from_secs(FUNCTION_TIMEOUT_S),
                isolation: self.isolation,
                max_concurrency: CLIENTS,
                env,
                snapstart: false,
                network: kindling_runtime_api::environment::Network::Outbound,
                layers: Vec::new(),
                credentials: None,
            },
            hypervisor: self.hypervisor,
            event_invoke: None,
            url: None,
        }
    }
}

/// Whether this bench runs inside the nested-KVM harness (`kindling bench --nested`), where
/// every guest's time is emulated twice over.
pub fn nested() -> bool {
    std::env::var_os(kindling_nested_kvm::INSIDE_ENV).is_some()
}

/// What every server of the bench is built from.
#[derive(Debug)]
pub struct Setup {
    /// The python no-op's code folder.
    pub code: std::path::PathBuf,
    /// The `provided` no-op's code folder (its `bootstrap`).
    pub provided_code: std::path::PathBuf,
    /// The images guests boot, when not the image cache's (inside the nested harness).
    pub images: Option<kindling_images::ImagesManifest>,
}

/// One run's numbers for one target.
#[derive(Debug, Clone)]
pub struct Run {
    /// First invocation of a fresh server: environment start → answer.
    pub cold_total: Duration,
    /// From that invocation's `REPORT` line, in ms (`Init Duration`, `Guest Boot`, ...).
    pub cold_phases: Vec<(String, f64)>,
    /// Warm invokes one after the other on one connection.
    pub warm: Vec<Duration>,
    /// Invokes per second of `warm`.
    pub sequential_rate: f64,
    /// Invokes per second with [`CLIENTS`] clients at once.
    pub concurrent_rate: f64,
    /// Memory of this process's children while the VMs ran, per program.
    pub children_rss: BTreeMap<String, ProgramRss>,
    /// SnapStart's two cold starts, where the target can take snapshots.
    pub snapstart: Option<SnapStartRun>,
    /// CPU of one sequential warm invoke, the server's and the environment's.
    pub cpu_per_invoke: CpuSpent,
    /// Median µs of each hop of the sequential warm invokes, in the invocation's order.
    pub hops: Vec<(String, f64)>,
    /// What the server held before the sequential warm invokes and after them.
    pub held: (Held, Held),
}

/// A SnapStart function's cold starts, each the first invocation of a fresh server.
#[derive(Debug, Clone)]
pub struct SnapStartRun {
    /// Boot → first answer, less the snapshot taken on the way.
    pub booted: Duration,
    /// Taking the snapshot (pause, save, resume), on the first invocation's path.
    pub snapshot: Duration,
    /// The snapshot's first restore → its first answer (a kindling-vmm clone then records
    /// the snapshot's working set).
    pub first_restored: Duration,
    /// A later restore → first answer (kindling-vmm reads the working set in at once).
    pub restored: Duration,
    /// The restored cold start's `REPORT` breakdown (`Restore Duration`, `Billed Restore
    /// Duration`, `Hypervisor Start`, `Jail Start`, `Snapshot Load`), in ms.
    pub restored_phases: Vec<(String, f64)>,
    /// Its `Duration`: the first event → its result, in ms.
    pub restored_duration_ms: f64,
}

/// Checks, before anything is measured, that the server can be built for `target` the
/// way the bench asks (a microVM that would silently become a sandbox is an error).
pub fn check(target: Target, setup: &Setup, state_dir: &Path) -> anyhow::Result<()> {
    if prepare(target.function(setup), setup, state_dir)?
        .functions
        .iter()
        .any(|f| f.isolation != target.isolation)
    {
        bail!("{} cannot run on this host", target.label());
    }
    Ok(())
}

/// A fresh in-process server for one function, built as `kindling serve` builds it.
struct Serving {
    addr: SocketAddr,
    logs: broadcast::Receiver<LogLine>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Serving {
    async fn start(
        function: FunctionConfig,
        setup: &Setup,
        state_dir: &Path,
    ) -> anyhow::Result<Self> {
        let environments::Prepared {
            functions,
            launchers,
            ..
        } = prepare(function, setup, state_dir)?;
        let mut options = ServerOptions::new(state_dir);
        options.invoke_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        // Environments live through the run, however slow the machine.
        options.idle_timeout = Duration::from_secs(3600);
        options.trace_hops = true;
        options.init_timeout = if nested() {
            NESTED_INIT_TIMEOUT
        } else {
            INIT_TIMEOUT
        };
        let server = Server::bind(functions, launchers, options).await?;
        let addr = server.local_addr();
        let logs = server.logs();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    // A dropped sender stops the server too.
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self {
            addr,
            logs,
            stop,
            task,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task
            .await
            .context("the server task failed")?
            .context("the server failed")
    }
}

/// One function and its launcher, as the server is built.
fn prepare(
    function: FunctionConfig,
    setup: &Setup,
    state_dir: &Path,
) -> anyhow::Result<environments::Prepared> {
    let isolation = function.function.isolation;
    environments::prepare(
        vec![function],
        None,
        setup.images.clone(),
        state_dir,
        Some(isolation),
        None,
    )
}

/// Starts a fresh server for `target` in `state_dir`, measures, and stops it.
pub async fn run(
    target: Target,
    setup: &Setup,
    state_dir: &Path,
    invokes: usize,
    progress: &ProgressBar,
    interrupt: Interrupt,
) -> anyhow::Result<Run> {
    let server = Serving::start(target.function(setup), setup, state_dir).await?;
    let measured = tokio::select! {
        measured = measure(target, server.addr, server.logs.resubscribe(), invokes, progress) => measured,
        () = interrupt.clone().wait() => Err(anyhow!("interrupted")),
    };
    server.stop().await?;
    let mut run = measured?;
    if target.snapstart().is_ok() {
        progress.set_message(format!("{}: SnapStart", target.label()));
        run.snapstart =
            Some(snapstart(target, setup, &state_dir.join("snapstart"), interrupt).await?);
        progress.inc(2);
    }
    Ok(run)
}

/// The same function with SnapStart, three times from a fresh server on one state folder:
/// the first cold start boots and takes the snapshot, the second restores it (and records
/// its working set), the third restores it as every later cold start does.
async fn snapstart(
    target: Target,
    setup: &Setup,
    state_dir: &Path,
    interrupt: Interrupt,
) -> anyhow::Result<SnapStartRun> {
    let mut function = target.function(setup);
    function.function.snapstart = true;
    let cold_start = || async {
        let mut server = Serving::start(function.clone(), setup, state_dir).await?;
        let measured = tokio::select! {
            measured = async {
                let mut client = Client::connect(server.addr).await?;
                let started = Instant::now();
                invoke(&mut client).await?;
                let took = started.elapsed();
                let line =
                    report::next_report(&mut server.logs, FUNCTION, Duration::from_secs(10)).await?;
                anyhow::Ok((took, line))
            } => measured,
            () = interrupt.clone().wait() => Err(anyhow!("interrupted")),
        };
        server.stop().await?;
        measured
    };
    let (booted, line) = cold_start()
        .await
        .context("SnapStart, the booting cold start")?;
    let snapshot_ms = phase_ms(&report::breakdown(&line)?, "Snapshot Create")
        .context("the first SnapStart cold start took no snapshot")?;
    let (first_restored, _) = cold_start()
        .await
        .context("SnapStart, the first restoring cold start")?;
    let (restored, line) = cold_start()
        .await
        .context("SnapStart, the restoring cold start")?;
    let restored_phases = report::breakdown(&line)?;
    if phase_ms(&restored_phases, "Restore Duration").is_none() {
        bail!("the third SnapStart cold start was not restored: {line}");
    }
    Ok(SnapStartRun {
        booted: booted.saturating_sub(Duration::from_secs_f64(snapshot_ms / 1000.0)),
        snapshot: Duration::from_secs_f64(snapshot_ms / 1000.0),
        first_restored,
        restored,
        restored_duration_ms: report::duration_ms(&line)
            .with_context(|| format!("a REPORT without its Duration: {line}"))?,
        restored_phases,
    })
}

pub fn phase_ms(phases: &[(String, f64)], name: &str) -> Option<f64> {
    phases.iter().find(|(n, _)| n == name).map(|(_, ms)| *ms)
}

async fn measure(
    target: Target,
    addr: SocketAddr,
    mut logs: broadcast::Receiver<LogLine>,
    invokes: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Run> {
    let mut client = Client::connect(addr).await?;

    progress.set_message(format!("{}: cold start", target.label()));
    let started = Instant::now();
    invoke(&mut client).await.context("the cold invocation")?;
    let cold_total = started.elapsed();
    let cold_phases = report::next_breakdown(&mut logs, FUNCTION, Duration::from_secs(10)).await?;
    drop(logs);
    progress.inc(1);

    progress.set_message(format!("{}: warm invokes, 1 client", target.label()));
    drop(client);
    let progress_of_thread = progress.clone();
    let sequential =
        tokio::task::spawn_blocking(move || sequential(addr, invokes, &progress_of_thread))
            .await
            .context("the sequential client's thread failed")??;

    progress.set_message(format!(
        "{}: starting {CLIENTS} environments",
        target.label()
    ));
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(Client::connect(addr).await?);
    }
    // One invocation per environment at a time: CLIENTS invocations at once bring up
    // CLIENTS environments, and those starts stay out of the timed part.
    let clients = concurrently(clients, CLIENTS, progress).await?;

    progress.set_message(format!(
        "{}: warm invokes, {CLIENTS} clients",
        target.label()
    ));
    let started = Instant::now();
    concurrently(clients, invokes, progress).await?;
    let concurrent_rate = invokes as f64 / started.elapsed().as_secs_f64();
    // After the work, so that the memory the hypervisors grew while serving counts.
    let children_rss = rss::descendants_by_program(u64::from(MEMORY_MIB) << 20)?;
    check_vms_ran(target, &children_rss)?;

    Ok(Run {
        cold_total,
        cold_phases,
        warm: sequential.warm,
        sequential_rate: sequential.rate,
        concurrent_rate,
        children_rss,
        snapstart: None,
        cpu_per_invoke: sequential.cpu_per_invoke,
        hops: sequential.hops,
        held: sequential.held,
    })
}

/// The sequential warm invokes, and what they cost.
struct Sequential {
    warm: Vec<Duration>,
    rate: f64,
    cpu_per_invoke: CpuSpent,
    hops: Vec<(String, f64)>,
    held: (Held, Held),
}

/// Times `invokes` warm invokes one after the other on one connection, from a thread of
/// its own (with a runtime of its own), so that the client's CPU is told apart from the
/// server's; gathers each answer's hops ([`HEADER_HOPS`]).
fn sequential(
    addr: SocketAddr,
    invokes: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Sequential> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = Client::connect(addr).await?;
        for _ in 0..WARM_UP {
            invoke(&mut client).await?;
        }
        let held_before = Held::now()?;
        let mut warm = Vec::with_capacity(invokes);
        let mut traced: Vec<Vec<(String, f64)>> = Vec::with_capacity(invokes);
        let cpu_before = CpuSample::now()?;
        let started = Instant::now();
        for _ in 0..invokes {
            let one = Instant::now();
            let answer = invoke(&mut client).await?;
            let took = one.elapsed();
            warm.push(took);
            let mut hops = answer
                .headers
                .get(HEADER_HOPS)
                .and_then(|v| hops::parse(v.to_str().ok()?))
                .context("an answer without its hops (kindling serve --trace-hops)")?;
            let server: f64 = hops.iter().map(|(_, us)| us).sum();
            hops.insert(
                0,
                (
                    CALLER.to_string(),
                    (took.as_secs_f64() * 1e6 - server).max(0.0),
                ),
            );
            traced.push(hops);
            progress.inc(1);
        }
        let elapsed = started.elapsed();
        let spent = cpu_before.until(&CpuSample::now()?);
        let held_after = Held::now()?;
        let per = |d: Duration| d / u32::try_from(invokes.max(1)).unwrap_or(u32::MAX);
        Ok(Sequential {
            rate: invokes as f64 / elapsed.as_secs_f64(),
            cpu_per_invoke: CpuSpent {
                server: per(spent.server),
                environments: per(spent.environments),
            },
            hops: median_hops(&traced),
            warm,
            held: (held_before, held_after),
        })
    })
}

/// The hop of a warm invoke that the server cannot see: the caller's request and the
/// answer on the wire, hyper on both ends (the invoke's time less every other hop).
pub const CALLER: &str = "caller ↔ host";

/// Each hop's median over the invokes, in the order they first appear.
fn median_hops(traced: &[Vec<(String, f64)>]) -> Vec<(String, f64)> {
    let mut names: Vec<&str> = Vec::new();
    for hops in traced {
        for (name, _) in hops {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    names
        .into_iter()
        .map(|name| {
            let values = traced
                .iter()
                .filter_map(|hops| hops.iter().find(|(n, _)| n == name).map(|(_, us)| *us));
            (name.to_string(), median(values).unwrap_or(0.0))
        })
        .collect()
}

/// `total` invokes shared out among `clients`, each on its own task, all at once; gives
/// the clients back for the next round.
async fn concurrently(
    clients: Vec<Client>,
    total: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<Client>> {
    let share = total.div_ceil(clients.len());
    let mut remaining = total;
    let mut tasks = JoinSet::new();
    for mut client in clients {
        let mine = share.min(remaining);
        remaining -= mine;
        let progress = progress.clone();
        tasks.spawn(async move {
            for _ in 0..mine {
                invoke(&mut client).await?;
                progress.inc(1);
            }
            anyhow::Ok(client)
        });
    }
    let mut clients = Vec::with_capacity(tasks.len());
    while let Some(done) = tasks.join_next().await {
        clients.push(done.context("a client task failed")??);
    }
    Ok(clients)
}

/// The VM processes must be there while VMs serve: otherwise the RSS numbers would
/// silently describe nothing.
fn check_vms_ran(target: Target, children: &BTreeMap<String, ProgramRss>) -> anyhow::Result<()> {
    let missing: BTreeSet<_> = target
        .hypervisor_programs()
        .iter()
        .filter(|p| !children.contains_key(**p))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{}: no {missing:?} process found among this process's descendants while its VMs ran",
            target.label()
        );
    }
    Ok(())
}

/// One invocation of the no-op function; anything but a clean answer is an error.
async fn invoke(client: &mut Client) -> anyhow::Result<InvokeResponse> {
    let answer = client
        .invoke(FUNCTION, &b"{}"[..], &InvokeOptions::default())
        .await?;
    if !answer.status.is_success() || answer.function_error.is_some() {
        bail!(
            "{FUNCTION} answered {} ({}): {}",
            answer.status,
            answer
                .function_error
                .as_deref()
                .unwrap_or("no function error"),
            String::from_utf8_lossy(&answer.body)
        );
    }
    Ok(answer)
}
