//! End to end through real microVMs (issue 6, "Tests"): real guests (kernel, init,
//! switch_root into the ext4 root, bootstrap over vsock, a Lambda runtime) booted by the
//! real `kindling serve`, invoked over the real Invoke API.
//!
//! Booting a guest costs seconds under QEMU's TCG, so every trial of a backend shares one
//! server, each trial with functions of its own. The harness is libtest-mimic (the
//! `[[test]]` entry has `harness = false`) because the shared server must be stopped
//! *after* every trial: `sigterm_leaves_nothing_behind` runs in a second phase, sends it
//! SIGTERM and checks that none of its processes, environment dirs or sockets is left.
//!
//! Backends: `qemu` always; `kindling` (kindling-vmm on KVM) where this host's KVM can boot
//! a Linux guest. Where it cannot (nested `kvm_pvm`), the trial `kindling::in_nested_kvm`
//! (a phase of its own, after the scenarios) re-runs this binary's `kindling::` trials inside the nested-KVM harness
//! (`kindling-nested-kvm`), with the images from a manifest (`kindling serve --images`).
//! Missing prerequisites print one `SKIPPED: <reason>` line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

// The sandbox suite also reads `rss_kib` and `fds` of it.
#[allow(dead_code)]
#[path = "common/attacks.rs"]
mod attacks;
#[path = "common/gauge.rs"]
mod gauge;
#[path = "common/internet.rs"]
mod internet;
#[path = "common/unprivileged.rs"]
mod unprivileged;

use attacks::check_attacks;
use gauge::Gauge;
use kindling_images::ImagesManifest;
use kindling_microvm::guest_clock;
use kindling_nested_kvm::{shell_quote, Job, LinuxKvm, Unfinished};
use kindling_plumbing::cgroup::Hierarchies;
use kindling_runtime_api::client::{self, InvokeOptions, InvokeResponse};
use libtest_mimic::{Arguments, Failed, Trial};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use unprivileged::{check_guest_privileges, check_unprivileged};

/// How long one invocation may take, cold start included, on a busy 2-core machine: more
/// than the longest init timeout ([`NESTED_INIT_TIMEOUT_S`]) and a function's run, so that
/// a slow cold start fails as the server answers it, not as the client giving up.
const INVOKE_PATIENCE: Duration = Duration::from_secs(150);
/// `kindling serve` stops within its 5 s shutdown grace plus a stop grace per VM.
const STOP_PATIENCE: Duration = Duration::from_secs(30);
/// Trials at once (unless `--test-threads` says otherwise): every trial boots guests, and
/// too many TCG boots at once on a 2-core machine push cold starts past the init timeout.
const DEFAULT_TEST_THREADS: usize = 2;
/// The init timeout of `kindling serve` where guests run emulated: under QEMU's TCG a cold
/// start takes ~2 s alone and, two at once on 2 busy cores, now and then past Lambda's 10 s.
const TCG_INIT_TIMEOUT_S: u32 = 30;
/// Inside the nested-KVM host, where every guest instruction is emulated twice over and
/// the cold starts share one emulated CPU (on a loaded 2-core host, a python guest with a
/// network took more than 40 s from hypervisor start to its runtime's first `/next`).
const NESTED_INIT_TIMEOUT_S: u32 = 90;
/// The timeout of the `timeout` function, as the caller's error message states it.
const SHORT_TIMEOUT_S: u32 = 2;

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    args.test_threads.get_or_insert(DEFAULT_TEST_THREADS);
    // Inside the nested-KVM host: only the kindling backend, on the images it was given.
    let nested_inside = std::env::var_os(kindling_nested_kvm::INSIDE_ENV).is_some();
    if !nested_inside {
        if let Some(reason) = missing_prerequisite() {
            println!("SKIPPED: {reason}");
            return ExitCode::SUCCESS;
        }
    }
    let mut backends = Vec::new();
    if !nested_inside {
        backends.push(Backend::Qemu);
    }
    let nested_reason = match kindling_nested_kvm::linux_kvm() {
        LinuxKvm::Here => {
            backends.push(Backend::Kindling);
            None
        }
        LinuxKvm::Nested(reason) => Some(reason),
    };
    let manifest = PathBuf::from(format!("/tmp/kvme2e-{}-images.json", std::process::id()));
    if !args.list && !nested_inside {
        if let Err(e) = build_images(&manifest) {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    }
    let hosts: Vec<Arc<Host>> = backends.into_iter().map(Host::new).collect();
    let trials: Vec<Trial> = hosts.iter().flat_map(scenarios).collect();
    let scenarios_done = libtest_mimic::run(&args, trials);
    // The nested run gets the machine to itself: its emulated host beside QEMU/TCG guests
    // would push their cold starts past the 10 s init timeout.
    let nested = nested_reason.map(|reason| {
        let manifest = manifest.clone();
        Trial::test("kindling::in_nested_kvm", move || {
            kindling_backend_nested(&reason, &manifest)
        })
    });
    let nested_done = libtest_mimic::run(&args, nested.into_iter().collect());
    let shutdown = hosts
        .iter()
        .map(|host| {
            let host = host.clone();
            Trial::test(
                format!("{}::sigterm_leaves_nothing_behind", host.backend.name()),
                move || host.stop_and_check(),
            )
        })
        .collect();
    let shutdown_done = libtest_mimic::run(&args, shutdown);
    // Servers a filter kept from their shutdown trial are stopped here.
    drop(hosts);
    let _ = std::fs::remove_file(&manifest);
    if scenarios_done.has_failed() || nested_done.has_failed() || shutdown_done.has_failed() {
        ExitCode::from(101)
    } else {
        ExitCode::SUCCESS
    }
}

/// Why this machine cannot boot guests under QEMU, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if let Err(e) = kindling_images::locate::guest_bin_dir() {
        return Some(e);
    }
    [
        kindling_microvm::qemu::QEMU,
        kindling_microvm::qemu::VHOST_VSOCK,
    ]
    .into_iter()
    .find(|program| which(program).is_none())
    .map(|program| format!("{program} is not installed (scripts/setup.sh installs it)"))
}

/// `program`'s path on `$PATH`, as the microvm backends will spawn it.
fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// Builds (or finds cached) the kernel, initramfs and the root images the tests boot, and
/// writes their paths to `manifest`: a server builds missing images on its first cold
/// start, which would not fit in the scheduler's init timeout. Its progress goes to stderr:
/// a first build takes minutes.
fn build_images(manifest: &Path) -> Result<(), String> {
    let status = Command::new(env!("CARGO_BIN_EXE_kindling"))
        .args(["images", "build", "--runtime", "python"])
        .args(["--runtime", "provided-debian", "--manifest"])
        .arg(manifest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run kindling images build: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kindling images build failed ({status})"))
    }
}

/// Which trials run inside the nested-KVM harness (a libtest filter; all `kindling::` ones
/// by default): one trial alone, while working on it, takes minutes instead of many.
const NESTED_FILTER_ENV: &str = "KINDLING_E2E_NESTED_FILTER";

/// Every trial inside L1 (where only the kindling backend runs).
const ALL_NESTED: &str = "kindling::";

/// How long L1 may go without a word from the trials (the longest takes ~2 min there):
/// past it L1 has stopped making progress (see [`Job::quiet_limit`]).
const NESTED_QUIET_LIMIT: Duration = Duration::from_secs(300);

/// After an L1 that stopped making progress with no trial failed: the trials it had not
/// finished run once more in a fresh L1 (`job` takes the libtest arguments that skip the
/// finished ones). A trial that fails, there or in the first L1, fails the run.
fn rerun_unfinished(
    stalled: &Unfinished,
    job: impl Fn(String) -> Job,
) -> Result<kindling_nested_kvm::Outcome, Failed> {
    let finished: Vec<&str> = stalled
        .output
        .lines()
        .filter_map(|line| line.strip_prefix("test ")?.strip_suffix(" ... ok"))
        .map(str::trim)
        .collect();
    if stalled.output.contains("... FAILED") {
        return Err(stalled.to_string().into());
    }
    println!(
        "nested-kvm: L1 stopped making progress after {} trials passed ({}); the rest run \
         once more in a fresh L1. The first L1's output:",
        finished.len(),
        stalled.why.lines().next().unwrap_or_default()
    );
    for line in stalled.output.lines() {
        println!("  | {line}");
    }
    let skips: String = finished
        .iter()
        .map(|name| format!(" --skip {}", shell_quote(name)))
        .collect();
    Ok(kindling_nested_kvm::run(&job(format!("--exact{skips}")))?)
}

/// Runs the `kindling::` trials inside the nested-KVM harness: this test binary, `kindling`,
/// the static `kindling-vmm` and `kindling-jailer`, the images of `manifest` (booted through `kindling serve --images`), the
/// functions' code and `mkfs.ext4` (code images are built there) go along.
fn kindling_backend_nested(reason: &str, manifest: &Path) -> Result<(), Failed> {
    let images = ImagesManifest::load(manifest)?;
    let exe = std::env::current_exe()?;
    let kindling = Path::new(env!("CARGO_BIN_EXE_kindling"));
    // The jailed VMM and its jailer: static builds, beside the static guest binaries.
    let statics = kindling_images::locate::guest_bin_dir()?;
    let mkfs = which("mkfs.ext4").ok_or("mkfs.ext4 is not installed (e2fsprogs)")?;
    // The server's packet filter and NAT (`nft`), and the network trial's own internet
    // (iproute2's `ip netns`): ahead of L1's busybox on its PATH.
    let nft = which("nft").ok_or("nft is not installed (nftables)")?;
    let ip = which("ip").ok_or("ip is not installed (iproute2)")?;
    let mut path: Vec<String> = [&nft, &ip]
        .iter()
        .filter_map(|p| Some(p.parent()?.to_string_lossy().into_owned()))
        .collect();
    path.dedup();
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut code: Vec<&str> = FUNCTIONS
        .iter()
        .flat_map(|f| std::iter::once(f.code).chain(f.layers.iter().copied()))
        .collect();
    code.sort();
    code.dedup();
    let filter = std::env::var(NESTED_FILTER_ENV).unwrap_or_else(|_| ALL_NESTED.into());
    // The job, running this binary with `args` (after the libtest options).
    let job = |args: &str| {
        let mut job = Job::new(format!(
            "export PATH={}:\"$PATH\"\nexec {} --test-threads=1 --color never {args}",
            shell_quote(&path.join(":")),
            shell_quote(&exe.to_string_lossy()),
        ))
        .file(&exe)
        .file(&nft)
        .file(&ip)
        .file(kindling)
        .file(statics.join("kindling-vmm"))
        .file(statics.join("kindling-jailer"))
        .env("KINDLING_GUEST_BIN_DIR", statics.to_string_lossy())
        .file(manifest)
        .file(&images.kernel)
        .file(&images.initramfs)
        .file(&mkfs)
        .file("/etc/mke2fs.conf")
        .env("KINDLING_IMAGES", manifest.to_string_lossy())
        .timeout(Duration::from_secs(900))
        .quiet_limit(NESTED_QUIET_LIMIT);
        for root in images.runtimes.values() {
            job = job.file(&root.ext4);
        }
        for dir in &code {
            job = job.file(checkout.join(dir));
        }
        job
    };
    println!("nested-kvm: the kindling backend's trials run inside the harness: {reason}");
    let outcome = match kindling_nested_kvm::run(&job(&shell_quote(&filter))) {
        Err(e) if filter == ALL_NESTED => match e.downcast::<Unfinished>() {
            Ok(stalled) => rerun_unfinished(&stalled, |skips| job(&skips))?,
            Err(e) => return Err(e.into()),
        },
        outcome => outcome?,
    };
    println!("{}", outcome.timing());
    for line in outcome.output.lines() {
        println!("  | {line}");
    }
    check(
        outcome.success() && outcome.output.contains("test result: ok"),
        || {
            format!(
                "the kindling backend failed inside the nested-KVM host (status {:?}); its console:\n{}",
                outcome.status, outcome.console
            )
        },
    )
}

/// A hypervisor backend under test.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Qemu,
    Kindling,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Qemu => "qemu",
            Backend::Kindling => "kindling",
        }
    }

    /// The program that runs a guest (the process to kill when a hypervisor dies).
    fn hypervisor_program(self) -> &'static str {
        match self {
            Backend::Qemu => kindling_microvm::qemu::QEMU,
            Backend::Kindling => "kindling-vmm",
        }
    }
}

/// One test function of the shared server's functions.toml.
struct FunctionDef {
    name: &'static str,
    /// Relative to the checkout.
    code: &'static str,
    runtime: &'static str,
    handler: &'static str,
    timeout_s: u32,
    max_concurrency: u32,
    snapstart: bool,
    /// `outbound` or `none`.
    network: &'static str,
    /// Folders relative to the checkout, unpacked in order into `/opt`.
    layers: &'static [&'static str],
    /// `host` (the server's, [`internet::CREDENTIALS_ENV`]) or `none`.
    credentials: &'static str,
}

/// The code every python test function boots: `tests/vm-functions/probe/app.py`.
const PROBE: &str = "tests/vm-functions/probe";
/// The network tests' probe: `tests/vm-functions/netprobe/app.py`.
const NETPROBE: &str = "tests/vm-functions/netprobe";

/// One function per trial, so that trials running at once never share an environment.
const FUNCTIONS: &[FunctionDef] = &[
    FunctionDef::probe("warm", 10, 1),
    FunctionDef::probe("inspect", 10, 1),
    FunctionDef::probe("identity", 10, 1),
    FunctionDef {
        name: "bash",
        code: "examples/hello-bash",
        runtime: "provided-debian",
        handler: "function.handler",
        timeout_s: 10,
        max_concurrency: 1,
        snapstart: false,
        network: "outbound",
        layers: &[],
        credentials: "none",
    },
    FunctionDef {
        name: "layered",
        code: "tests/functions/layer-user",
        runtime: "python",
        handler: "app.handler",
        timeout_s: 10,
        max_concurrency: 1,
        snapstart: false,
        network: "outbound",
        layers: &["tests/layers/tools"],
        credentials: "none",
    },
    FunctionDef::probe("crash", 10, 1),
    FunctionDef::probe("timeout", SHORT_TIMEOUT_S, 1),
    FunctionDef::probe("vmkill", 60, 1),
    FunctionDef::probe("vsockkill", 60, 1),
    FunctionDef::probe("pair", 30, 2),
    FunctionDef::probe("flood", 60, 1),
    FunctionDef::probe("bomb", 5, 1),
    FunctionDef {
        snapstart: true,
        ..FunctionDef::probe("snap", 30, 3)
    },
    FunctionDef {
        code: NETPROBE,
        ..FunctionDef::probe("net", 60, 1)
    },
    FunctionDef {
        code: NETPROBE,
        ..FunctionDef::probe("peer", 60, 1)
    },
    FunctionDef {
        code: NETPROBE,
        network: "none",
        ..FunctionDef::probe("offline", 60, 1)
    },
    FunctionDef {
        name: "stream",
        code: "tests/functions/node-cases",
        runtime: "node",
        handler: "cases.streamsSlowly",
        timeout_s: 30,
        max_concurrency: 1,
        snapstart: false,
        network: "outbound",
        layers: &[],
        credentials: "none",
    },
    FunctionDef {
        snapstart: true,
        ..FunctionDef::probe("snapbad", 30, 2)
    },
    FunctionDef {
        code: NETPROBE,
        snapstart: true,
        ..FunctionDef::probe("snapnet", 60, 3)
    },
    FunctionDef {
        name: "ext",
        code: "tests/functions/extensions",
        runtime: "python",
        handler: "app.handler",
        timeout_s: 30,
        max_concurrency: 1,
        snapstart: false,
        network: "outbound",
        layers: &["tests/functions/extensions/layer"],
        credentials: "none",
    },
    FunctionDef {
        code: "tests/functions/signer",
        handler: "app.call",
        credentials: "host",
        ..FunctionDef::probe("caller", 60, 1)
    },
];

impl FunctionDef {
    const fn probe(name: &'static str, timeout_s: u32, max_concurrency: u32) -> Self {
        Self {
            name,
            code: PROBE,
            runtime: "python",
            handler: "app.handler",
            timeout_s,
            max_concurrency,
            snapstart: false,
            network: "outbound",
            layers: &[],
            credentials: "none",
        }
    }

    /// The `[functions.NAME]` table (TOML basic strings are JSON strings).
    fn toml(&self) -> String {
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
        let path = |relative: &str| Value::from(checkout.join(relative).to_string_lossy());
        let layers: Vec<String> = self.layers.iter().map(|l| path(l).to_string()).collect();
        format!(
            "[functions.{}]\ncode = {}\nruntime = {}\nhandler = {}\nmemory = 128\n\
             timeout = {}\nisolation = \"microvm\"\nmax_concurrency = {}\nsnapstart = {}\n\
             network = {}\nlayers = [{}]\ncredentials = {}\n\n",
            self.name,
            path(self.code),
            Value::from(self.runtime),
            Value::from(self.handler),
            self.timeout_s,
            self.max_concurrency,
            self.snapstart,
            Value::from(self.network),
            layers.join(", "),
            Value::from(self.credentials),
        )
    }
}

/// The trials of one backend, each run against its shared server.
fn scenarios(host: &Arc<Host>) -> Vec<Trial> {
    type Scenario = fn(&Server, Backend) -> Result<(), Failed>;
    /// `(name, scenario)` pairs, each named after its function.
    macro_rules! named {
        ($($scenario:ident),* $(,)?) => { vec![$((stringify!($scenario), $scenario as Scenario)),*] };
    }
    let mut list = named![
        python_second_invoke_is_warm,
        bash_custom_runtime,
        killed_runtime_then_next_works,
        timeout_replaces_the_vm,
        dead_hypervisor_fails_one_invocation,
        concurrent_invocations_get_two_vms,
        init_switches_root_and_is_pid1,
        the_runtime_runs_unprivileged,
        layers_reach_opt,
        a_hostile_function_stays_in_its_vm,
        floods_leave_the_host_bounded,
        outbound_network_only,
        calls_an_api_by_name_with_the_hosts_credentials,
        snapstart_restores_clones,
        snapstart_boots_when_its_snapshot_is_broken,
    ];
    if matches!(host.backend, Backend::Qemu) {
        // The nested-KVM host carries the python and provided images, not node's, which
        // the streaming function runs on.
        list.extend(named![
            dead_vsock_daemon_fails_one_invocation,
            response_streams_through_the_vm,
            an_extension_runs_in_the_vm
        ]);
    }
    if matches!(host.backend, Backend::Kindling) {
        list.extend(named![snapstart_clones_get_networks_of_their_own]);
    }
    list.into_iter()
        .map(|(name, scenario)| {
            let host = host.clone();
            Trial::test(format!("{}::{name}", host.backend.name()), move || {
                scenario(host.server()?, host.backend)
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Scenarios

/// The second invocation reuses the first one's microVM and runtime, which was paused in
/// between: the background process the first started stamps the time every 20 ms while
/// invocations run and not at all in the 1.5 s between them (no extra boot for this).
fn python_second_invoke_is_warm(server: &Server, _: Backend) -> Result<(), Failed> {
    let stamp = json!({"action": "stamp", "seconds": 1.0});
    let cold = server.invoke("warm", &stamp)?;
    let cold_body = cold.ok_json()?;
    let report = cold.report()?;
    for phase in ["Init Duration: ", "Hypervisor Start: ", "Guest Boot: "] {
        check(report.contains(phase), || {
            format!("cold REPORT lacks {phase}: {report}")
        })?;
    }
    let during = |body: &Value| body["stamp"]["during"].as_u64().unwrap_or_default();
    let gap = |body: &Value| body["stamp"]["largest_gap"].as_f64().unwrap_or_default();
    check(during(&cold_body) >= 5 && gap(&cold_body) < 0.5, || {
        format!("the background process did not run steadily during the invocation: {cold_body}")
    })?;
    std::thread::sleep(Duration::from_millis(1500));
    let warm = server.invoke("warm", &stamp)?;
    let warm_body = warm.ok_json()?;
    let report = warm.report()?;
    check(!report.contains("Init Duration"), || {
        format!("warm REPORT has an Init Duration: {report}")
    })?;
    check(
        warm_body["boot_id"] == cold_body["boot_id"] && warm_body["pid"] == cold_body["pid"],
        || format!("not the same microVM and runtime: {cold_body} then {warm_body}"),
    )?;
    check(gap(&warm_body) >= 1.0, || {
        format!("the microVM was not paused between invocations: {warm_body}")
    })?;
    check(during(&warm_body) >= 5, || {
        format!("the background process did not resume: {warm_body}")
    })
}

fn bash_custom_runtime(server: &Server, _: Backend) -> Result<(), Failed> {
    let answer = server.invoke("bash", &json!({"from": "bash"}))?;
    answer.ok()?;
    let body = String::from_utf8_lossy(&answer.response.body);
    check(
        body.trim() == r#"Echoing request: '{"from":"bash"}'"#,
        || format!("unexpected answer from the AWS tutorial runtime: {body:?}"),
    )?;
    // The tutorial's handler echoes the event to stderr, which is the function's log.
    let tail = answer.tail();
    check(tail.contains(r#"{"from":"bash"}"#), || {
        format!("the handler's stderr is not in the log: {tail}")
    })
}

/// An external extension from a layer (`tests/functions/extensions/layer`) runs in the
/// microVM: it registers, gets `INVOKE` with the request id and the function's lines over
/// the Telemetry API on `sandbox.localdomain`, and its second of work after each `INVOKE`
/// holds the VM's next event.
fn an_extension_runs_in_the_vm(server: &Server, _: Backend) -> Result<(), Failed> {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let first = server.invoke("ext", &json!({}))?;
    first.ok_json()?;
    let answered = now();
    let id = first
        .response
        .headers
        .get("x-amzn-requestid")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let second = server.invoke("ext", &json!({}))?.ok_json()?;
    // The guest's clock follows the host's (stepped past 20 ms of skew on each event).
    let waited = second["at"].as_f64().unwrap_or_default() - answered;
    check(waited > 0.8, || {
        format!("the second event came {waited:.3} s after the first answer: the extension did not hold it")
    })?;
    let log = server.state_dir.join("logs/ext.log");
    let wanted = [
        "EXTENSION\tName: probe-ext\tState: Ready\tEvents: [INVOKE, SHUTDOWN]".to_string(),
        format!("probe-ext INVOKE {id}"),
        format!("probe-ext telemetry function function line of {id}"),
        format!("probe-ext telemetry platform.report {id}"),
        format!("probe-ext done {id}"),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|w| !text.contains(w.as_str()))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the log lacks {missing:?}:\n{text}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node `streamifyResponse` handler in a microVM streams through the agent's vsock
/// relay and the host: over `InvokeWithResponseStream`, its two writes a second apart
/// reach the caller a second apart, then the stream's `InvokeComplete`.
fn response_streams_through_the_vm(server: &Server, _: Backend) -> Result<(), Failed> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(server.addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        conn,
        "POST /2021-11-15/functions/stream/response-streaming-invocations HTTP/1.1\r\n\
         Host: kindling\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    )?;
    let begun = Instant::now();
    let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
    let (mut first, mut second) = (None, None);
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if first.is_none() && text.contains("first\n") {
            first = Some(begun.elapsed());
        }
        if second.is_none() && text.contains("second\n") {
            second = Some(begun.elapsed());
        }
    }
    let text = String::from_utf8_lossy(&seen);
    let (Some(first), Some(second)) = (first, second) else {
        return Err(format!("the stream lacks its chunks: {text:?}").into());
    };
    check(second - first >= Duration::from_millis(800), || {
        format!(
            "chunks {:?} apart, not as written: {text:?}",
            second - first
        )
    })?;
    check(
        text.contains("InvokeComplete") && !text.contains("ErrorCode"),
        || format!("no clean InvokeComplete: {text:?}"),
    )
}

/// The function cannot use the guest's root: no uid 0, no capabilities, no way back; init
/// and the agent keep only the capabilities they use; and the hypervisor's processes (QEMU and its vsock daemon, or the jailed kindling-vmm) run
/// as the VM's own unprivileged user with no capability, in a network namespace of their
/// own, under seccomp filters.
fn the_runtime_runs_unprivileged(server: &Server, backend: Backend) -> Result<(), Failed> {
    let answer = server
        .invoke("identity", &json!({"action": "identity"}))?
        .ok_json()?;
    check_unprivileged(&answer)?;
    check_guest_privileges(&answer, true)?;
    let programs: &[&str] = match backend {
        Backend::Qemu => &[
            kindling_microvm::qemu::QEMU,
            kindling_microvm::qemu::VHOST_VSOCK,
        ],
        Backend::Kindling => &["kindling-vmm"],
    };
    let vm_ids = kindling_microvm::machine::VM_IDS;
    for program in programs {
        let pids = server.processes_of("identity", program);
        check(!pids.is_empty(), || {
            format!("no {program} of identity runs")
        })?;
        for pid in pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            let field = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            let uids: Vec<u32> = field("Uid:")
                .split_whitespace()
                .filter_map(|id| id.parse().ok())
                .collect();
            check(
                uids.len() == 4 && uids.iter().all(|id| vm_ids.contains(id)),
                || format!("{program} {pid} does not run as a VM user:\n{status}"),
            )?;
            check(
                field("CapEff:") == "0000000000000000" && field("NoNewPrivs:") == "1",
                || format!("{program} {pid} keeps privileges:\n{status}"),
            )?;
            for kind in ["net", "mnt", "pid", "ipc"] {
                let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}"));
                check(ns(&pid.to_string())? != ns("self")?, || {
                    format!("{program} {pid} shares the host's {kind} namespace")
                })?;
            }
            // Its root is a chroot holding only what it needs: no host /etc, no /proc,
            // none of the server's files beside the VM's socket folder.
            let root = PathBuf::from(format!("/proc/{pid}/root"));
            for host_file in [
                PathBuf::from("etc/passwd"),
                PathBuf::from("proc/self"),
                server.scratch.join("functions.toml"),
            ] {
                let inside = root.join(host_file.strip_prefix("/").unwrap_or(&host_file));
                check(!inside.exists(), || {
                    format!("{program} {pid} sees the host's {}", host_file.display())
                })?;
            }
            check(field("Seccomp:") == "2", || {
                format!("{program} {pid} runs without a seccomp filter:\n{status}")
            })?;
            if *program == kindling_microvm::qemu::QEMU {
                check_qemu_sandbox(pid)?;
            }
            check_own_cgroup(program, pid)?;
        }
    }
    Ok(())
}

/// QEMU runs with its own seccomp filter, `-sandbox` with every deny option, on top of the
/// jailer's denylist.
fn check_qemu_sandbox(pid: u32) -> Result<(), Failed> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let sandbox = args
        .iter()
        .position(|a| a == "-sandbox")
        .and_then(|at| args.get(at + 1));
    let options: Vec<&str> = sandbox.map(|s| s.split(',').collect()).unwrap_or_default();
    let wanted = [
        "on",
        "obsolete=deny",
        "elevateprivileges=deny",
        "spawn=deny",
        "resourcecontrol=deny",
    ];
    check(wanted.iter().all(|o| options.contains(o)), || {
        format!(
            "QEMU {pid} runs without `-sandbox {}`: {args:?}",
            wanted.join(",")
        )
    })
}

/// A jailed program is in a cgroup of its own (`kindling-vms/<program>/vm-<uid>`) whose
/// memory and task limits are set: neither is the host's unlimited default.
fn check_own_cgroup(program: &str, pid: u32) -> Result<(), Failed> {
    let listed = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let found = Hierarchies::read().map_err(|e| Failed::from(e.to_string()))?;
    // `ID:controllers:/path`, where v2's line names no controller.
    let path_of = |controller: &str| {
        listed.lines().find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, names, path) = (fields.next()?, fields.next()?, fields.next()?);
            let held = if controller.is_empty() {
                names.is_empty()
            } else {
                names.split(',').any(|n| n == controller)
            };
            held.then(|| path.trim_start_matches('/').to_string())
        })
    };
    let (memory, pids) = match found.v2_offering(&["memory", "pids"]) {
        Some(root) => {
            let dir = root.join(path_of("").unwrap_or_default());
            (dir.join("memory.max"), dir.join("pids.max"))
        }
        None => {
            let in_v1 = |controller: &str, file: &str| -> Option<PathBuf> {
                Some(found.v1(controller)?.join(path_of(controller)?).join(file))
            };
            (
                in_v1("memory", "memory.limit_in_bytes").unwrap_or_default(),
                in_v1("pids", "pids.max").unwrap_or_default(),
            )
        }
    };
    for file in [&memory, &pids] {
        check(file.to_string_lossy().contains("/kindling-vms/"), || {
            format!("{program} {pid} has no cgroup of its own: {file:?} from\n{listed}")
        })?;
    }
    let read = |file: &Path| std::fs::read_to_string(file).unwrap_or_default();
    let memory_limit: u64 = read(&memory).trim().parse().unwrap_or(u64::MAX);
    check(memory_limit <= 4 << 30, || {
        format!(
            "{program} {pid}'s memory is not limited: {memory:?} = {}",
            read(&memory)
        )
    })?;
    check(read(&pids).trim().parse::<u32>().is_ok(), || {
        format!(
            "{program} {pid}'s tasks are not limited: {pids:?} = {}",
            read(&pids)
        )
    })
}

/// A layer's drive is the guest's read-only `/opt`: its `python` package imports, its
/// `bin` program runs from `PATH`.
fn layers_reach_opt(server: &Server, _: Backend) -> Result<(), Failed> {
    let answer = server.invoke("layered", &json!({}))?.ok_json()?;
    check(
        answer["value"] == "first layer"
            && answer["package"] == "/opt/python/layerpkg/__init__.py"
            && answer["tool"] == "layer-tool ran with hi"
            && answer["opt_writable"] == false,
        || format!("layered: {answer}"),
    )
}

/// From inside the VM, every attack of the sandbox suite (`tests/sandbox_e2e/adversarial.rs`)
/// fails: remounts, cgroup v1 and `release_agent`, `/proc/sys`, its own limits, modules,
/// block devices, ptrace and signals to init and the agent, the host's files and services.
fn a_hostile_function_stays_in_its_vm(server: &Server, _: Backend) -> Result<(), Failed> {
    let secret = server.scratch.join("host-secret");
    std::fs::write(&secret, "the host's secret")?;
    let ports = [server.addr.port(), 22];
    let event = json!({
        "action": "attacks",
        "host_file": secret,
        "host_ports": ports,
    });
    let answer = server.invoke("identity", &event)?.ok_json()?;
    let attacks = answer["attacks"].as_object().cloned().unwrap_or_default();
    check(attacks.len() > 20, || {
        format!("too few attacks ran: {answer}")
    })?;
    // The runtime's vsock sockets are the seccomp filter's to refuse (EPERM).
    check_attacks(&attacks, nix::errno::Errno::EPERM, &ports).map_err(Failed::from)
}

/// What a flood may add to the server's resident memory, and to the VM's host processes'
/// beyond the guest memory they map.
const FLOOD_HEADROOM_KIB: u64 = 64 << 10;

/// Floods from inside the VM — MiBs of logs, garbage and idle connections on its Runtime
/// API, a fork bomb, a full `/tmp` — fail at most their own invocation. The server and the
/// VM's processes on the host (the hypervisor, QEMU's vsock daemon) stay bounded (their
/// peak RSS and fds are printed), and the next invocation works.
fn floods_leave_the_host_bounded(server: &Server, backend: Backend) -> Result<(), Failed> {
    server.invoke("flood", &json!({}))?.ok_json()?;
    // Under nested TCG a guest prints far slower: fewer MiB make the same point there.
    let mib = match backend {
        Backend::Qemu => 64,
        Backend::Kindling => 16,
    };
    let mut programs = vec![backend.hypervisor_program()];
    if matches!(backend, Backend::Qemu) {
        programs.push(kindling_microvm::qemu::VHOST_VSOCK);
    }
    let watched = |function: &str| -> Vec<(&str, u32)> {
        let vm = programs.iter().flat_map(|&program| {
            server
                .processes_of(function, program)
                .into_iter()
                .map(move |pid| (program, pid))
        });
        [("kindling serve", server.pid)]
            .into_iter()
            .chain(vm)
            .collect()
    };
    // The hypervisor's RSS counts the guest pages it maps; only growth past them matters.
    let guest_kib = 128 << 10;
    let bounded = |what: &str, peaks: Vec<gauge::Peaks>| -> Result<(), Failed> {
        for peaks in &peaks {
            let headroom = if peaks.name == backend.hypervisor_program() {
                guest_kib + FLOOD_HEADROOM_KIB
            } else {
                FLOOD_HEADROOM_KIB
            };
            peaks.within(what, headroom)?;
        }
        Ok(())
    };

    let what = format!("{mib} MiB of logs from inside a VM");
    let gauge = Gauge::start(&what, &watched("flood"));
    let answer = server.invoke("flood", &json!({"action": "spew", "mib": mib}))?;
    let body = answer.ok_json()?;
    check(body["spewed_mib"] == mib, || format!("spew: {body}"))?;
    check(answer.tail().len() <= 4096, || {
        format!("a 4 KB tail: {} bytes", answer.tail().len())
    })?;
    bounded(&what, gauge.finish())?;

    let what = "abuse of the Runtime API inside a VM";
    let gauge = Gauge::start(what, &watched("flood"));
    let answer = server.invoke("flood", &json!({"action": "runtime_api_abuse"}))?;
    let seen = answer.ok_json()?["seen"].clone();
    println!("the VM's Runtime API answered: {seen}");
    for case in ["garbage", "huge header", "bogus id"] {
        let line = seen[case].as_str().unwrap_or_default();
        check(
            line.is_empty() || line.starts_with("errno") || line.contains(" 4"),
            || format!("{case}: {line:?}"),
        )?;
    }
    bounded(what, gauge.finish())?;

    let what = "a full /tmp inside a VM";
    let gauge = Gauge::start(what, &watched("flood"));
    let answer = server.invoke("flood", &json!({"action": "fill_tmp"}))?;
    let body: Value = serde_json::from_slice(&answer.response.body).unwrap_or_default();
    println!("fill /tmp in a VM: {body}");
    // ENOSPC, or the guest's OOM kill once its memory is full; or the timeout, where the
    // guest's reclaim thrashes on its page cache before the OOM kill comes (seen once in
    // the nested harness, where every refault is emulated twice over). Each way the VM is
    // replaced, as the next invocation shows.
    match answer.response.function_error {
        None => check(body["fill_tmp"]["stopped"] == "ENOSPC", || {
            format!("fill /tmp: {body}")
        })?,
        Some(_) => check(
            ["Runtime.OutOfMemory", "Sandbox.Timedout"]
                .contains(&body["errorType"].as_str().unwrap_or_default()),
            || format!("fill /tmp: {body}"),
        )?,
    }
    bounded(what, gauge.finish())?;
    server.invoke("flood", &json!({}))?.ok_json()?;

    // Its timeout (or the guest's memory) ends a fork bomb, and its VM with it.
    server.invoke("bomb", &json!({}))?.ok_json()?;
    let what = "a fork bomb inside a VM";
    let gauge = Gauge::start(what, &watched("bomb"));
    let answer = server.invoke("bomb", &json!({"action": "fork_bomb"}))?;
    let body: Value = serde_json::from_slice(&answer.response.body).unwrap_or_default();
    println!("fork bomb in a VM: {body}");
    check(
        [
            "Sandbox.Timedout",
            "Runtime.OutOfMemory",
            "Runtime.ExitError",
        ]
        .contains(&body["errorType"].as_str().unwrap_or_default()),
        || format!("fork bomb: {body}"),
    )?;
    bounded(what, gauge.finish())?;
    server.invoke("bomb", &json!({}))?.ok_json().map(drop)
}

fn killed_runtime_then_next_works(server: &Server, _: Backend) -> Result<(), Failed> {
    let crashed = server.invoke("crash", &json!({"action": "exit"}))?;
    crashed.unhandled("Runtime.ExitError")?;
    let next = server.invoke("crash", &json!({"action": "hello"}))?;
    next.ok_json().map(drop)
}

fn timeout_replaces_the_vm(server: &Server, _: Backend) -> Result<(), Failed> {
    let first = server
        .invoke("timeout", &json!({"action": "hello"}))?
        .ok_json()?;
    let started = Instant::now();
    let timed_out = server.invoke("timeout", &json!({"action": "sleep", "seconds": 30}))?;
    let took = started.elapsed();
    let body = timed_out.unhandled("Sandbox.Timedout")?;
    let expected = format!("Task timed out after {SHORT_TIMEOUT_S}.00 seconds");
    check(
        body["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains(&expected)),
        || format!("expected {expected:?}: {body}"),
    )?;
    let limit = Duration::from_secs(u64::from(SHORT_TIMEOUT_S) + 5);
    check(took < limit, || {
        format!("the caller waited {took:?} for a timeout")
    })?;
    // The host ends it past asking the guest: the figure is the agent's last while it ran.
    let report = timed_out.report()?;
    check(
        report.ends_with("\tStatus: timeout") && !report.contains("\tMax Memory Used: 0 MB"),
        || format!("a timeout's REPORT without the memory its runtime used: {report}"),
    )?;
    let next = server.invoke("timeout", &json!({"action": "hello"}))?;
    let next_body = next.ok_json()?;
    let report = next.report()?;
    check(report.contains("Init Duration: "), || {
        format!("the invocation after a timeout is not a cold start: {report}")
    })?;
    check(next_body["boot_id"] != first["boot_id"], || {
        format!("the timed-out microVM was reused: {first} then {next_body}")
    })
}

fn dead_hypervisor_fails_one_invocation(server: &Server, backend: Backend) -> Result<(), Failed> {
    dies_mid_invocation(server, "vmkill", backend.hypervisor_program())
}

/// QEMU's vsock is a separate daemon: its death must not leave the caller waiting for
/// the function's timeout.
fn dead_vsock_daemon_fails_one_invocation(server: &Server, _: Backend) -> Result<(), Failed> {
    dies_mid_invocation(server, "vsockkill", kindling_microvm::qemu::VHOST_VSOCK)
}

/// Kills `function`'s `program` process while a slow handler runs: that invocation fails
/// at once with a Lambda-style error, and the next one gets a fresh microVM.
fn dies_mid_invocation(
    server: &Server,
    function: &'static str,
    program: &str,
) -> Result<(), Failed> {
    let first = server
        .invoke(function, &json!({"action": "hello"}))?
        .ok_json()?;
    let slow = server.invoke_in_background(function, json!({"action": "sleep", "seconds": 30}));
    server.wait_for_log(function, "sleeping 30 s")?;
    let victims = server.processes_of(function, program);
    check(victims.len() == 1, || {
        format!("expected one {program} for {function}: {victims:?}")
    })?;
    kill(Pid::from_raw(i32::try_from(victims[0])?), Signal::SIGKILL)?;
    let started = Instant::now();
    let failed = slow.join().map_err(|_| "the invoking thread panicked")??;
    check(started.elapsed() < Duration::from_secs(20), || {
        format!(
            "the caller waited {:?} after {program} died",
            started.elapsed()
        )
    })?;
    failed.unhandled("Runtime.ExitError")?;
    let next = server.invoke(function, &json!({"action": "hello"}))?;
    let next_body = next.ok_json()?;
    check(next_body["boot_id"] != first["boot_id"], || {
        format!("a dead microVM answered: {first} then {next_body}")
    })
}

fn concurrent_invocations_get_two_vms(server: &Server, _: Backend) -> Result<(), Failed> {
    let slow = json!({"action": "sleep", "seconds": 3});
    let a = server.invoke_in_background("pair", slow.clone());
    let b = server.invoke_in_background("pair", slow);
    let mut boot_ids = Vec::new();
    for answer in [a, b] {
        let answer = answer
            .join()
            .map_err(|_| "the invoking thread panicked")??;
        let body = answer.ok_json()?;
        let report = answer.report()?;
        check(report.contains("Init Duration: "), || {
            format!("each of two concurrent invocations needs its own cold start: {report}")
        })?;
        boot_ids.push(body["boot_id"].clone());
    }
    check(boot_ids[0] != boot_ids[1], || {
        format!("both invocations ran in one microVM: {boot_ids:?}")
    })?;
    let consoles = server.live_consoles("pair");
    check(consoles.len() == 2, || {
        format!("expected two environments of pair: {consoles:?}")
    })?;
    for console in &consoles {
        let text = std::fs::read_to_string(console)?;
        check(text.contains("init: bootstrap started at"), || {
            format!("{}: no bootstrap: {text}", console.display())
        })?;
    }
    Ok(())
}

/// Outbound networking (issue 10): the guest fetches a page by name from the test's own
/// "internet" (tests/common/internet.rs) through its virtio-net, the host's tap and NAT and
/// the test's DNS server, and cannot reach the host's Invoke API, another host port,
/// another microVM (serving meanwhile, as the host sees) or 169.254.169.254 (routed to a
/// listener); a `network = "none"` function has only its loopback.
fn outbound_network_only(server: &Server, _: Backend) -> Result<(), Failed> {
    network_trial(server).map_err(|e| server.with_consoles(e, &["net", "peer"]))
}

fn network_trial(server: &Server) -> Result<(), Failed> {
    let internet = internet::Internet::start()?;
    let host = internet::HostListener::start();
    // Each cold start alone: two guests booting at once inside the nested-KVM host, on
    // its one emulated CPU, can outlast the init timeout.
    server.invoke("net", &json!({}))?.ok_json()?;
    let peer = server.invoke("peer", &json!({}))?.ok_json()?["address"]
        .as_str()
        .ok_or("the peer has no address")?
        .to_string();
    let serving = server.invoke_in_background("peer", json!({"serve_seconds": 15}));
    std::thread::sleep(Duration::from_secs(4));
    let from_host = internet::host_reaches(&format!("{peer}:8080"));
    let probe = internet::probe_event(server.addr.port(), host.port, &peer);
    let answer = server.invoke("net", &probe)?.ok_json()?;
    let served = serving
        .join()
        .map_err(|_| "the invoking thread panicked")??
        .ok_json()?;
    check(from_host.as_deref() == Some("peer\n"), || {
        format!("the host did not reach the peer's listener: {from_host:?}")
    })?;
    check(served["accepted"] == 1, || {
        format!("something besides the host reached the peer: {served}")
    })?;
    check(
        internet::host_reaches(&format!("{}:80", internet::METADATA)).is_some(),
        || "the metadata address has no listener".into(),
    )?;
    internet::check_outbound_only(&answer, server.addr.port(), host.port, &peer)?;
    check(host.accepted() == 0, || {
        "the host port saw a connection".into()
    })?;
    let web = format!("{}:80", internet::WEB);
    let offline = server
        .invoke("offline", &json!({"reach": [web]}))?
        .ok_json()?;
    check(offline["reach"][&web] == "errno 101", || {
        format!("a network = \"none\" guest reached out: {offline}")
    })?;
    drop(internet);
    Ok(())
}

/// The issue's "done when", in a microVM: a function signs a request with the credentials
/// kindling hands it and sends it by DNS name to the test's internet, whose API verifies
/// the signature.
fn calls_an_api_by_name_with_the_hosts_credentials(
    server: &Server,
    _: Backend,
) -> Result<(), Failed> {
    let call = || -> Result<(), Failed> {
        let internet = internet::Internet::start()?;
        let answer = server
            .invoke("caller", &internet::signed_call_event())?
            .ok_json()?;
        internet::check_signed_call(&answer)?;
        drop(internet);
        Ok(())
    };
    call().map_err(|e| server.with_consoles(e, &["caller"]))
}

/// SnapStart: the first cold start boots and snapshots the guest once its runtime has
/// initialised; with that environment busy, two more invocations at once each get an
/// environment restored from the snapshot (no boot on their consoles), which answer
/// correctly, share the init phase's random value and boot id (clones of one guest), yet
/// read different bytes from the kernel's random generator, which the host reseeded in each
/// (without that, two clones resumed from one state read the same bytes). On QEMU the
/// snapshot is QEMU's migration stream and the agent's line to the host a virtio-serial
/// port, which QEMU resets on restore as vsock would be.
fn snapstart_restores_clones(server: &Server, backend: Backend) -> Result<(), Failed> {
    snapstart_trial(server, backend).map_err(|e| server.with_consoles(e, &["snap"]))
}

fn snapstart_trial(server: &Server, backend: Backend) -> Result<(), Failed> {
    let started = Instant::now();
    let booted = server.invoke("snap", &json!({"action": "random"}))?;
    let boot_took = started.elapsed();
    let first = booted.ok_json()?;
    let report = booted.report()?;
    for field in ["Init Duration: ", "Guest Boot: ", "Snapshot Create: "] {
        check(report.contains(field), || {
            format!("the first cold start's REPORT lacks {field}: {report}")
        })?;
    }
    check(!report.contains("Restore Duration"), || {
        format!("the first cold start was restored: {report}")
    })?;
    let busy = server.invoke_in_background("snap", json!({"action": "sleep", "seconds": 8}));
    server.wait_for_log("snap", "sleeping 8 s")?;
    let started = Instant::now();
    let clones = [
        server.invoke_in_background("snap", json!({"action": "random"})),
        server.invoke_in_background("snap", json!({"action": "random"})),
    ];
    let mut restored = Vec::new();
    for clone in clones {
        let answer = clone.join().map_err(|_| "the invoking thread panicked")??;
        let took = started.elapsed();
        let body = answer.ok_json()?;
        let report = answer.report()?.to_string();
        check(
            report.contains("\tRestore Duration: ")
                && report.contains("\tBilled Restore Duration: ")
                && !report.contains("Init Duration")
                && !report.contains("Guest Boot")
                && !report.contains("Agent Start"),
            || format!("a second environment was not restored: {report}"),
        )?;
        // What the init phase made is the snapshot's (the kernel's boot_id is not: Linux
        // makes it on its first read, which came after the snapshot).
        check(body["init_random"] == first["init_random"], || {
            format!("not a clone of the snapshot's guest: {first} then {body}")
        })?;
        restored.push((body, report, took));
    }
    let busy = busy
        .join()
        .map_err(|_| "the invoking thread panicked")??
        .ok_json()?;
    check(busy["pid"] == first["pid"], || {
        format!("the first environment did not keep serving: {first} then {busy}")
    })?;
    let urandom = |body: &Value| body["urandom"].as_str().unwrap_or_default().to_string();
    let mut seen = vec![urandom(&first), urandom(&busy)];
    for (body, _, _) in &restored {
        check(!seen.contains(&urandom(body)), || {
            format!(
                "two environments read the same kernel random bytes (no reseed): {seen:?} and {}",
                urandom(body)
            )
        })?;
        seen.push(urandom(body));
    }
    let consoles = server.live_consoles("snap");
    check(consoles.len() == 3, || {
        format!("expected three environments of snap: {consoles:?}")
    })?;
    let mut booted_consoles = 0;
    for console in &consoles {
        let text = std::fs::read_to_string(console)?;
        if text.contains("init: bootstrap started at") {
            booted_consoles += 1;
        } else {
            check(text.contains("reseeded with entropy from the host"), || {
                format!(
                    "{}: a restored guest was not reseeded:\n{text}",
                    console.display()
                )
            })?;
            // Nor did the clock fail to follow the host's (the agent's `SYS_TIME`).
            check(!text.contains("cannot set the clock"), || {
                format!(
                    "{}: a restored guest could not set its clock:\n{text}",
                    console.display()
                )
            })?;
        }
    }
    check(booted_consoles == 1, || {
        format!("{booted_consoles} of the three environments booted; one should have")
    })?;
    // Only kindling-vmm restores map the memory file and record a working set; QEMU
    // reads its whole migration stream.
    let working_set = match backend {
        Backend::Kindling => recorded_working_set(server, "snap")?,
        Backend::Qemu => 0,
    };
    let restore_took = restored
        .iter()
        .map(|(_, _, took)| *took)
        .max()
        .unwrap_or_default();
    println!(
        "snapstart: boot → first answer {boot_took:.2?} (snapshot included), two restores at once → \
         answers {restore_took:.2?}; working set recorded: {} MiB; REPORTs:\n  {report}\n  {}\n  {}",
        working_set >> 20,
        restored[0].1, restored[1].1
    );
    Ok(())
}

/// The working set the first clones of `function`'s snapshot recorded once paused after
/// their first answer (kindling-vmm: `vm.prefetch` beside the snapshot): byte ranges of
/// the memory file in whole 2 MiB chunks. Returns their bytes.
fn recorded_working_set(server: &Server, function: &str) -> Result<u64, Failed> {
    const CHUNK: u64 = 2 << 20;
    let snapshots = server.state_dir.join("snapshots").join(function);
    let deadline = Instant::now() + INVOKE_PATIENCE;
    let path = loop {
        let found = std::fs::read_dir(&snapshots)?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("vm.prefetch"))
            .find(|p| p.is_file());
        match found {
            Some(path) => break path,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            None => {
                return Err(
                    format!("no working set was recorded in {}", snapshots.display()).into(),
                )
            }
        }
    };
    let ranges: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let ranges = ranges.as_array().cloned().unwrap_or_default();
    let field = |r: &Value, name: &str| r[name].as_u64().unwrap_or(1);
    check(
        !ranges.is_empty()
            && ranges.iter().all(|r| {
                field(r, "offset") % CHUNK == 0
                    && field(r, "len") % CHUNK == 0
                    && field(r, "len") > 0
            }),
        || {
            format!(
                "{}: not ranges of whole 2 MiB chunks: {ranges:?}",
                path.display()
            )
        },
    )?;
    Ok(ranges.iter().map(|r| field(r, "len")).sum())
}

/// SnapStart with a network (issue 10): the snapshot is taken with the guest's virtio-net,
/// and every clone restored from it leases a tap and address of its own and is moved onto
/// them before its first event. With the first environment busy serving on port 8080, two
/// clones restored at once each fetch the test internet's page by name and report an
/// address of their own (neither the snapshot's nor each other's), and neither reaches the
/// first environment's listener, which the host does reach.
fn snapstart_clones_get_networks_of_their_own(server: &Server, _: Backend) -> Result<(), Failed> {
    snapstart_network_trial(server).map_err(|e| server.with_consoles(e, &["snapnet"]))
}

fn snapstart_network_trial(server: &Server) -> Result<(), Failed> {
    let internet = internet::Internet::start()?;
    let page = format!("http://{}/", internet::NAME);
    let address = |body: &Value| body["address"].as_str().unwrap_or_default().to_string();
    let fetched = |body: &Value, who: &str| {
        check(
            body["page"] == internet::PAGE
                && body["resolv_conf"] == format!("nameserver {}\n", internet::DNS),
            || format!("{who} did not fetch the page by name: {body}"),
        )
    };
    let booted = server.invoke("snapnet", &json!({"fetch": page}))?;
    let first = booted.ok_json()?;
    let report = booted.report()?;
    check(report.contains("Snapshot Create: "), || {
        format!("the first cold start took no snapshot: {report}")
    })?;
    fetched(&first, "the environment that took the snapshot")?;
    let first_listener = format!("{}:8080", address(&first));
    let serving = server.invoke_in_background("snapnet", json!({"serve_seconds": 30}));
    std::thread::sleep(Duration::from_secs(4));
    let from_host = internet::host_reaches(&first_listener);
    let event = json!({"fetch": page, "reach": [first_listener]});
    let clones = [
        server.invoke_in_background("snapnet", event.clone()),
        server.invoke_in_background("snapnet", event),
    ];
    let mut addresses = vec![address(&first)];
    for clone in clones {
        let answer = clone.join().map_err(|_| "the invoking thread panicked")??;
        let body = answer.ok_json()?;
        let report = answer.report()?;
        check(
            report.contains("\tRestore Duration: ") && !report.contains("Init Duration"),
            || format!("a second environment was not restored: {report}"),
        )?;
        fetched(&body, "a restored clone")?;
        check(body["reach"][&first_listener] != "connected", || {
            format!("a clone reached another environment: {body}")
        })?;
        let own = address(&body);
        check(own.starts_with("10.") && !addresses.contains(&own), || {
            format!("a clone's address {own:?} is not its own (others: {addresses:?}): {body}")
        })?;
        addresses.push(own);
    }
    let served = serving
        .join()
        .map_err(|_| "the invoking thread panicked")??
        .ok_json()?;
    check(from_host.as_deref() == Some("peer\n"), || {
        format!("the host did not reach the first environment's listener: {from_host:?}")
    })?;
    check(served["accepted"] == 1, || {
        format!("something besides the host reached the first environment: {served}")
    })?;
    println!("snapstart network: the snapshot's guest and two clones at {addresses:?}");
    drop(internet);
    Ok(())
}

/// What the trial below writes over a snapshot's state file.
const BROKEN_STATE: &[u8] = b"{\"not\": \"a kindling-vmm state file\"}";

/// SnapStart's fallback: the first cold start boots and takes the snapshot; its state file
/// is then broken on disk, so the next cold start's restore is refused. That
/// start boots instead, in the same environment (its jail, user and sockets), answers, and
/// takes a fresh snapshot in place of the broken one.
fn snapstart_boots_when_its_snapshot_is_broken(server: &Server, _: Backend) -> Result<(), Failed> {
    broken_snapshot_trial(server).map_err(|e| server.with_consoles(e, &["snapbad"]))
}

fn broken_snapshot_trial(server: &Server) -> Result<(), Failed> {
    let first = server.invoke("snapbad", &json!({"action": "random"}))?;
    first.ok_json()?;
    let report = first.report()?;
    check(report.contains("Snapshot Create: "), || {
        format!("the first cold start took no snapshot: {report}")
    })?;
    let snapshots = server.state_dir.join("snapshots/snapbad");
    let states: Vec<PathBuf> = std::fs::read_dir(&snapshots)?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("vm.state"))
        .filter(|path| path.is_file())
        .collect();
    let [state] = states.as_slice() else {
        return Err(format!(
            "expected one snapshot in {}: {states:?}",
            snapshots.display()
        )
        .into());
    };
    std::fs::write(state, BROKEN_STATE)?;
    // The first environment busy, the next invocation is a cold start.
    let busy = server.invoke_in_background("snapbad", json!({"action": "sleep", "seconds": 8}));
    server.wait_for_log("snapbad", "sleeping 8 s")?;
    let fallback = server.invoke("snapbad", &json!({"action": "random"}));
    let log = server.stderr();
    let fallback = fallback.map_err(|e| {
        format!(
            "{}\nthe server's log:\n{log}",
            e.message().unwrap_or_default()
        )
    })?;
    fallback.ok_json()?;
    let report = fallback.report()?;
    check(
        report.contains("Init Duration: ")
            && report.contains("Snapshot Create: ")
            && !report.contains("Restore Duration"),
        || format!("the fallback did not boot and take a fresh snapshot: {report}"),
    )?;
    check(
        log.contains("SnapStart: the snapshot did not restore"),
        || format!("no restore was tried and refused:\n{log}"),
    )?;
    // The fresh snapshot has the same digest, so it took the broken one's place.
    check(
        std::fs::read(state).is_ok_and(|text| !text.starts_with(BROKEN_STATE)),
        || format!("the broken snapshot {} was kept", state.display()),
    )?;
    busy.join()
        .map_err(|_| "the invoking thread panicked")??
        .ok_json()?;
    Ok(())
}

fn init_switches_root_and_is_pid1(server: &Server, backend: Backend) -> Result<(), Failed> {
    let body = server
        .invoke("inspect", &json!({"action": "inspect"}))?
        .ok_json()?;
    // A warm invocation reads the guest's clock: on the host's (bootstrap sets it from
    // each event), it falls inside the host's window around the call, give or take a
    // transfer.
    let host_now = || -> Result<f64, Failed> {
        Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64())
    };
    let before = host_now()?;
    let warm = server
        .invoke("inspect", &json!({"action": "inspect"}))?
        .ok_json()?;
    let after = host_now()?;
    let guest_time = warm["time"].as_f64().unwrap_or_default();
    check((before - 0.05..=after + 0.05).contains(&guest_time), || {
        format!("the guest's clock read {guest_time:.3}, outside the invocation ({before:.3}..{after:.3})")
    })?;
    // A clock the vDSO reads and timers to the nanosecond: not jiffies, which a guest
    // under TCG falls back to unless given its TSC's rate (`microvm::guest_clock`), and
    // keeps where the host's TSC has no constant rate to give.
    let resolution = warm["clock_resolution"].as_f64().unwrap_or(f64::MAX);
    if matches!(backend, Backend::Kindling) || guest_clock::host_tsc_is_constant() {
        check(
            matches!(warm["clocksource"].as_str(), Some("tsc" | "kvm-clock")) && resolution <= 1e-6,
            || {
                format!(
                    "the guest keeps time with {} ({resolution} s steps)",
                    warm["clocksource"]
                )
            },
        )?;
    } else {
        eprintln!("guest clock not checked: this host's TSC has no constant rate (no constant_tsc/nonstop_tsc)");
    }
    check(body["pid1_comm"] == "init", || {
        format!("PID 1 is not our init: {body}")
    })?;
    // Module-free: the kernel has every driver built in and init is given none to load.
    check(body["proc_modules"] == false, || {
        format!("the guest kernel has loadable modules: {body}")
    })?;
    let cmdline = body["cmdline"].as_str().unwrap_or_default();
    check(
        cmdline.contains("kindling.root=/dev/vda") && !cmdline.contains("kindling.modules"),
        || format!("unexpected guest kernel command line: {cmdline:?}"),
    )?;
    let mounts = body["mounts"].as_str().unwrap_or_default();
    let mount_of = |target: &str| {
        mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(1) == Some(&target))
    };
    let root = mount_of("/").ok_or_else(|| format!("no / in /proc/mounts:\n{mounts}"))?;
    check(
        root[0] == "/dev/vda" && root[2] == "ext4" && root[3].split(',').any(|o| o == "ro"),
        || format!("/ is not the read-only ext4 root image: {root:?}\n{mounts}"),
    )?;
    let task = mount_of("/var/task").ok_or_else(|| format!("no /var/task:\n{mounts}"))?;
    check(task[0] == "/dev/vdb", || {
        format!("/var/task is not the code image: {task:?}")
    })?;
    let consoles = server.live_consoles("inspect");
    let console = match consoles.as_slice() {
        [one] => std::fs::read_to_string(one)?,
        other => return Err(format!("expected one environment of inspect: {other:?}").into()),
    };
    check(console.contains("init: switched root to /dev/vda"), || {
        format!("no switch_root in the console:\n{console}")
    })
}

// ---------------------------------------------------------------------------------------
// The shared server

/// A backend's server, started by the first trial that needs it.
struct Host {
    backend: Backend,
    server: OnceLock<Result<Server, String>>,
}

impl Host {
    fn new(backend: Backend) -> Arc<Self> {
        Arc::new(Self {
            backend,
            server: OnceLock::new(),
        })
    }

    fn server(&self) -> Result<&Server, Failed> {
        self.server
            .get_or_init(|| Server::start(self.backend))
            .as_ref()
            .map_err(|e| format!("kindling serve did not start: {e}").into())
    }

    /// SIGTERM to the server with at least one microVM running, then: it exits with
    /// success, none of its processes lives on, no environment dir is left, and the
    /// guest consoles went to the function's console log (`kindling logs --console`).
    fn stop_and_check(&self) -> Result<(), Failed> {
        let server = self.server()?;
        server
            .invoke("warm", &json!({"action": "hello"}))?
            .ok_json()?;
        let program = self.backend.hypervisor_program();
        let before = server.processes_of("warm", program);
        check(!before.is_empty(), || {
            format!("no {program} running before SIGTERM")
        })?;
        let status = server.terminate()?;
        check(status.success(), || {
            format!(
                "kindling serve exited {status} on SIGTERM:\n{}",
                server.stderr()
            )
        })?;
        let left = processes_mentioning(&server.state_dir);
        check(left.is_empty(), || {
            format!("left running after SIGTERM: {left:?}")
        })?;
        let envs: Vec<_> = std::fs::read_dir(server.state_dir.join("envs"))
            .map(|dir| dir.map(|e| e.map(|e| e.file_name())).collect())
            .unwrap_or_else(|_| Ok(Vec::new()))?;
        check(envs.is_empty(), || {
            format!("environment dirs left: {envs:?}")
        })?;
        let logs = Command::new(env!("CARGO_BIN_EXE_kindling"))
            .args(["logs", "warm", "--console", "--state-dir"])
            .arg(&server.state_dir)
            .output()?;
        let console = String::from_utf8_lossy(&logs.stdout);
        check(
            logs.status.success()
                && console.contains("=== environment warm-")
                && console.contains("init: switched root to /dev/vda")
                // Init's shutdown (cgroup removal, unmounts) had the capabilities it needs.
                && !console.contains("Permission denied")
                && !console.contains("Operation not permitted"),
            || format!("kindling logs warm --console: {}\n{console}", logs.status),
        )
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(Ok(server)) = self.server.get() {
            let _ = server.terminate();
        }
    }
}

/// A running `kindling serve` with every function of [`FUNCTIONS`].
struct Server {
    child: Mutex<Child>,
    pid: u32,
    addr: SocketAddr,
    /// The scratch folder: functions.toml, the server's output, and `state/`.
    scratch: PathBuf,
    state_dir: PathBuf,
}

impl Server {
    fn start(backend: Backend) -> Result<Self, String> {
        // Short: the state dir holds Unix sockets.
        let scratch = PathBuf::from(format!(
            "/tmp/kvme2e-{}-{}",
            std::process::id(),
            backend.name()
        ));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
        let functions = scratch.join("functions.toml");
        let text: String = FUNCTIONS.iter().map(FunctionDef::toml).collect();
        std::fs::write(&functions, text).map_err(|e| e.to_string())?;
        let state_dir = scratch.join("state");
        // Lambda's 10 s where guests run on KVM; more where they are emulated.
        let init_timeout = if std::env::var_os(kindling_nested_kvm::INSIDE_ENV).is_some() {
            NESTED_INIT_TIMEOUT_S
        } else if !kindling_microvm::probe::kvm().can_boot_linux {
            TCG_INIT_TIMEOUT_S
        } else {
            10
        };
        let output = |name: &str| {
            std::fs::File::create(scratch.join(name))
                .map(Stdio::from)
                .map_err(|e| e.to_string())
        };
        let child = Command::new(env!("CARGO_BIN_EXE_kindling"))
            .arg("serve")
            .arg("--functions")
            .arg(&functions)
            // Every address, so that the network trial shows that guests are refused the
            // Invoke API, not that it only listens on loopback.
            .args([
                "--hypervisor",
                backend.name(),
                "--addr",
                "0.0.0.0:0",
                "--allow-remote",
            ])
            .args(["--dns", internet::DNS])
            .args([
                "--idle-timeout",
                "600",
                "--init-timeout",
                &init_timeout.to_string(),
            ])
            .arg("--state-dir")
            .arg(&state_dir)
            .env("KINDLING_LOG", "kindling=info,warn")
            // For the functions with `credentials = "host"`.
            .envs(internet::CREDENTIALS_ENV)
            .stdin(Stdio::null())
            .stdout(output("serve.out")?)
            .stderr(output("serve.err")?)
            .spawn()
            .map_err(|e| format!("cannot start kindling serve: {e}"))?;
        let mut server = Server {
            pid: child.id(),
            child: Mutex::new(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            scratch,
            state_dir,
        };
        server.addr = server.wait_listening()?;
        Ok(server)
    }

    /// The address from `kindling: serving NAMES on http://ADDR`.
    fn wait_listening(&self) -> Result<SocketAddr, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.stderr();
            // Whole lines only: eprintln! writes a line in pieces, and a read may fall between.
            let whole = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
            let announced = whole
                .lines()
                .find_map(|l| l.strip_prefix("kindling: serving "))
                .and_then(|l| l.rsplit_once(" on http://"));
            if let Some((_, addr)) = announced {
                return addr.parse().map_err(|e| format!("{addr:?}: {e}"));
            }
            let exited = self.child.lock().expect("not poisoned").try_wait();
            if let Ok(Some(status)) = exited {
                return Err(format!("kindling serve exited ({status}):\n{text}"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "kindling serve did not listen within 30 s:\n{text}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.scratch.join("serve.err")).unwrap_or_default()
    }

    /// A `RequestResponse` invocation with the log tail, as `kindling invoke --log` does.
    fn invoke(&self, function: &str, event: &Value) -> Result<Answer, Failed> {
        invoke(self.addr, function, event)
    }

    /// Invokes on another thread; join to get the answer.
    fn invoke_in_background(
        &self,
        function: &'static str,
        event: Value,
    ) -> std::thread::JoinHandle<Result<Answer, Failed>> {
        let addr = self.addr;
        std::thread::spawn(move || invoke(addr, function, &event))
    }

    /// Waits until `function`'s log has a line containing `text`.
    fn wait_for_log(&self, function: &str, text: &str) -> Result<(), Failed> {
        let path = self.state_dir.join("logs").join(format!("{function}.log"));
        let deadline = Instant::now() + INVOKE_PATIENCE;
        while Instant::now() < deadline {
            if std::fs::read_to_string(&path).is_ok_and(|log| log.contains(text)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("{} never showed {text:?}", path.display()).into())
    }

    /// The live environment dirs of `function` (`<state>/envs/<function>-<pid>-<n>`).
    fn env_dirs(&self, function: &str) -> Vec<PathBuf> {
        let prefix = format!("{function}-{}-", self.pid);
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(self.state_dir.join("envs"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect();
        dirs.sort();
        dirs
    }

    /// The console logs of `function`'s live environments.
    /// `failure` with the server's log and the consoles of `functions`' environments,
    /// running and stopped.
    fn with_consoles(&self, failure: Failed, functions: &[&str]) -> Failed {
        let consoles: Vec<String> = functions
            .iter()
            .flat_map(|f| {
                let stopped = self.state_dir.join(format!("logs/{f}.console.log"));
                self.live_consoles(f).into_iter().chain([stopped])
            })
            .map(|c| {
                format!(
                    "{}:\n{}",
                    c.display(),
                    std::fs::read_to_string(&c).unwrap_or_default()
                )
            })
            .collect();
        format!(
            "{}\nthe server's log:\n{}\nconsoles:\n{}",
            failure.message().unwrap_or_default(),
            self.stderr(),
            consoles.join("\n")
        )
        .into()
    }

    fn live_consoles(&self, function: &str) -> Vec<PathBuf> {
        self.env_dirs(function)
            .into_iter()
            .map(|dir| dir.join("console.log"))
            .filter(|path| path.is_file())
            .collect()
    }

    /// Pids of `program` processes running one of `function`'s environments (their
    /// command lines name the environment dir).
    fn processes_of(&self, function: &str, program: &str) -> Vec<u32> {
        self.env_dirs(function)
            .iter()
            .flat_map(|dir| processes_mentioning(dir))
            .filter(|(_, argv0)| Path::new(argv0).file_name() == Some(program.as_ref()))
            .map(|(pid, _)| pid)
            .collect()
    }

    /// SIGTERM, then waits for the exit (SIGKILL after [`STOP_PATIENCE`]).
    fn terminate(&self) -> Result<std::process::ExitStatus, Failed> {
        let mut child = self.child.lock().expect("not poisoned");
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        kill(Pid::from_raw(i32::try_from(self.pid)?), Signal::SIGTERM)?;
        let deadline = Instant::now() + STOP_PATIENCE;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill()?;
        child.wait()?;
        Err(format!("kindling serve ignored SIGTERM for {STOP_PATIENCE:?}").into())
    }
}

impl Drop for Server {
    /// The scratch folder goes once the server is gone; a server that never stopped
    /// keeps it, for a look at what went wrong.
    fn drop(&mut self) {
        if matches!(self.child.get_mut().map(|c| c.try_wait()), Ok(Ok(Some(_)))) {
            let _ = std::fs::remove_dir_all(&self.scratch);
        }
    }
}

/// Live processes (pid, argv[0]) whose command line mentions `path`, other than this test.
fn processes_mentioning(path: &Path) -> Vec<(u32, String)> {
    let needle = path.to_string_lossy().into_owned();
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.iter()
                .any(|a| a.contains(&needle))
                .then(|| (pid, args[0].clone()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Invocations

/// One answer of the Invoke API.
struct Answer {
    function: String,
    response: InvokeResponse,
}

fn invoke(addr: SocketAddr, function: &str, event: &Value) -> Result<Answer, Failed> {
    let options = InvokeOptions {
        log_tail: true,
        ..InvokeOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let response = runtime
        .block_on(async {
            tokio::time::timeout(
                INVOKE_PATIENCE,
                client::invoke(addr, function, event.to_string(), &options),
            )
            .await
        })
        .map_err(|_| format!("invoking {function}: no answer within {INVOKE_PATIENCE:?}"))?
        .map_err(|e| format!("invoking {function}: {e:#}"))?;
    Ok(Answer {
        function: function.to_string(),
        response,
    })
}

impl Answer {
    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.response.body).into_owned()
    }

    /// The decoded `X-Amz-Log-Result`: this invocation's log, ending with its REPORT.
    fn tail(&self) -> &str {
        self.response.log_tail.as_deref().unwrap_or_default()
    }

    fn report(&self) -> Result<&str, Failed> {
        self.tail()
            .lines()
            .rev()
            .find(|l| l.starts_with("REPORT RequestId: "))
            .ok_or_else(|| {
                format!(
                    "{}: no REPORT line in the log tail:\n{}",
                    self.function,
                    self.tail()
                )
                .into()
            })
    }

    /// A 200 without a function error.
    fn ok(&self) -> Result<(), Failed> {
        check(
            self.response.status.is_success() && self.response.function_error.is_none(),
            || {
                format!(
                    "{} failed ({}, {:?}): {}\n{}",
                    self.function,
                    self.response.status,
                    self.response.function_error,
                    self.body_text(),
                    self.tail()
                )
            },
        )
    }

    fn ok_json(&self) -> Result<Value, Failed> {
        self.ok()?;
        serde_json::from_slice(&self.response.body)
            .map_err(|e| format!("{}: not JSON ({e}): {}", self.function, self.body_text()).into())
    }

    /// A Lambda-style unhandled error of `error_type`; returns its JSON.
    fn unhandled(&self, error_type: &str) -> Result<Value, Failed> {
        let body: Value = serde_json::from_slice(&self.response.body).unwrap_or_default();
        check(
            self.response.status.is_success()
                && self.response.function_error.as_deref() == Some("Unhandled")
                && body["errorType"] == error_type,
            || {
                format!(
                    "{}: expected an Unhandled {error_type}, got {} {:?}: {}",
                    self.function,
                    self.response.status,
                    self.response.function_error,
                    self.body_text()
                )
            },
        )?;
        Ok(body)
    }
}

/// `Err(message())` unless `condition`.
fn check(condition: bool, message: impl FnOnce() -> String) -> Result<(), Failed> {
    if condition {
        Ok(())
    } else {
        Err(message().into())
    }
}
