//! The fixture every test shares: the helper binaries, a generated `functions.toml`, and
//! a real `kindling serve` process with its own state dir and a free port, driven over
//! the real Invoke API. [`Server::stop`] sends SIGTERM and checks that nothing the
//! server made is left: processes, environment dirs, cgroups.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kindling_runtime_api::client::{self, InvokeOptions, InvokeResponse};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{geteuid, Pid};
use serde_json::Value;

/// The package whose `bootstrap` binary is the `lambda_runtime`-crate custom runtime.
const LAMBDA_RS_PACKAGE: &str = "kindling-test-lambda-rs-runtime";
/// The target that static guest programs are built for (an explicit target keeps
/// crt-static away from build scripts and proc macros).
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// How long `kindling serve` may take to listen, and to stop after SIGTERM (its shutdown
/// grace is 5 s, then each environment gets a short stop grace).
const START_PATIENCE: Duration = Duration::from_secs(15);
const STOP_PATIENCE: Duration = Duration::from_secs(30);

/// The programs the tests run.
pub struct Binaries {
    pub kindling: PathBuf,
    /// The `lambda_runtime`-crate runtime, to be copied into a code dir as `bootstrap`.
    pub lambda_rs_bootstrap: PathBuf,
}

/// Returns the binaries when this machine can run the suite; otherwise prints
/// `SKIPPED: <reason>` and returns `None`. `tools` are host programs the test's
/// functions need on the host.
pub fn prerequisites(tools: &[&str]) -> Option<&'static Binaries> {
    let reason = if !geteuid().is_root() {
        Some("the sandbox needs root".to_string())
    } else if let Err(e) = kindling_images::locate::guest_bin_dir() {
        Some(e)
    } else {
        tools
            .iter()
            .find(|t| !Path::new(t).exists())
            .map(|t| format!("{t} is not installed"))
    };
    match reason {
        Some(reason) => {
            println!("SKIPPED: {reason}");
            None
        }
        None => Some(binaries()),
    }
}

/// Builds (once per test binary) what `cargo test` does not: the sandbox helper, which
/// must sit beside `kindling` (same target dir and profile, so an up-to-date build costs
/// nothing), and the `lambda_runtime`-crate runtime, static as every `provided` function's
/// `bootstrap` must be (the `provided` root has no libc), the way scripts/build-guest.sh
/// builds the guest binaries.
fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let kindling = PathBuf::from(env!("CARGO_BIN_EXE_kindling"));
        let profile_dir = kindling.parent().expect("kindling is in a folder");
        let target_dir = profile_dir.parent().expect("a profile folder has a parent");
        let profile = profile_dir.file_name().and_then(|p| p.to_str());
        let cargo = || {
            let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
            cmd.arg("build")
                .arg("--target-dir")
                .arg(target_dir)
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            cmd
        };
        let helper = cargo()
            .args(["-p", "kindling-sandbox", "--profile"])
            .arg(match profile {
                Some("debug") | None => "dev",
                Some(other) => other,
            })
            .status()
            .expect("cannot run cargo");
        assert!(helper.success(), "building the sandbox helper failed");
        let runtime = cargo()
            .args([
                "-p",
                LAMBDA_RS_PACKAGE,
                "--release",
                "--target",
                GUEST_TARGET,
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .status()
            .expect("cannot run cargo");
        assert!(
            runtime.success(),
            "building the lambda_runtime bootstrap failed"
        );
        Binaries {
            lambda_rs_bootstrap: target_dir.join(GUEST_TARGET).join("release/bootstrap"),
            kindling,
        }
    })
}

/// This checkout's folders, e.g. `examples/hello-python`.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// One `[functions.NAME]` table; every test function is sandboxed.
pub struct FunctionDef {
    pub name: String,
    pub code: PathBuf,
    pub runtime: String,
    pub handler: String,
    pub memory: u32,
    pub timeout: u32,
    pub max_concurrency: u32,
    pub env: Vec<(String, String)>,
    /// `network = "…"`; `None` leaves the default (outbound).
    pub network: Option<&'static str>,
    /// `layers`: folders or zips, in order.
    pub layers: Vec<PathBuf>,
    /// `credentials`: `host` or `none`; unset leaves it to the server.
    pub credentials: Option<&'static str>,
    /// `url = true`: served over HTTP too (see [`Server::function_url`]).
    pub url: bool,
    /// `url_payload = "…"` (with `url`); `None` leaves the default (2.0).
    pub url_payload: Option<&'static str>,
}

impl FunctionDef {
    pub fn new(name: &str, code: impl Into<PathBuf>, runtime: &str, handler: &str) -> Self {
        Self {
            name: name.to_string(),
            code: code.into(),
            runtime: runtime.to_string(),
            handler: handler.to_string(),
            memory: 128,
            timeout: 5,
            max_concurrency: 2,
            env: Vec::new(),
            network: None,
            layers: Vec::new(),
            credentials: None,
            url: false,
            url_payload: None,
        }
    }

    /// `probe`: the microVM tests' probe function (`tests/vm-functions/probe`).
    pub fn probe() -> Self {
        Self::new(
            "probe",
            repo_path("tests/vm-functions/probe"),
            "python",
            "app.handler",
        )
    }

    /// A handler of `tests/functions/python-cases/cases.py`.
    pub fn python_case(name: &str, handler: &str) -> Self {
        Self::new(
            name,
            repo_path("tests/functions/python-cases"),
            "python",
            &format!("cases.{handler}"),
        )
    }

    /// The table, as `kindling serve` reads it (TOML basic strings are JSON strings).
    fn toml(&self) -> String {
        let q = |s: &str| Value::from(s).to_string();
        let mut t = format!(
            "[functions.{}]\ncode = {}\nruntime = {}\nhandler = {}\nmemory = {}\ntimeout = {}\n\
             isolation = \"sandbox\"\nmax_concurrency = {}\n",
            self.name,
            q(&self.code.to_string_lossy()),
            q(&self.runtime),
            q(&self.handler),
            self.memory,
            self.timeout,
            self.max_concurrency,
        );
        if let Some(network) = self.network {
            let _ = writeln!(t, "network = {}", q(network));
        }
        if !self.layers.is_empty() {
            let layers: Vec<String> = self
                .layers
                .iter()
                .map(|l| q(&l.to_string_lossy()))
                .collect();
            let _ = writeln!(t, "layers = [{}]", layers.join(", "));
        }
        if let Some(credentials) = self.credentials {
            let _ = writeln!(t, "credentials = {}", q(credentials));
        }
        if self.url {
            t.push_str("url = true\n");
        }
        if let Some(payload) = self.url_payload {
            let _ = writeln!(t, "url_payload = {}", q(payload));
        }
        if !self.env.is_empty() {
            let _ = writeln!(t, "[functions.{}.env]", self.name);
            for (k, v) in &self.env {
                let _ = writeln!(t, "{k} = {}", q(v));
            }
        }
        t
    }
}

/// A scratch folder under /tmp (short, for Unix socket paths), removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new() -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let dir = PathBuf::from(format!(
            "/tmp/kle2e-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `kindling serve`.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub state_dir: PathBuf,
    stderr: PathBuf,
    kindling: PathBuf,
    // Last, so that the folder goes after the server has stopped.
    _scratch: Scratch,
}

impl Server {
    /// Writes a functions.toml of `functions`, starts `kindling serve` on it and waits
    /// until it listens.
    pub fn start(bins: &Binaries, functions: &[FunctionDef]) -> Self {
        Self::start_with(bins, functions, &[], &[])
    }

    /// [`Server::start`] with more `serve` arguments and variables for the server.
    pub fn start_with(
        bins: &Binaries,
        functions: &[FunctionDef],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_on(bins, functions, "127.0.0.1:0", args, env)
    }

    /// [`Server::start_with`] on the Invoke API address `addr`.
    pub fn start_on(
        bins: &Binaries,
        functions: &[FunctionDef],
        addr: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let scratch = Scratch::new();
        let mut serve = Self::serve(bins, functions, &scratch);
        serve.args(args).envs(env.iter().copied());
        Self::launch(bins, scratch, serve, addr)
    }

    /// `kindling serve --functions F`, F a functions.toml of `functions` in `scratch`.
    pub fn serve(bins: &Binaries, functions: &[FunctionDef], scratch: &Scratch) -> Command {
        let file = scratch.path().join("functions.toml");
        let text: String = functions.iter().map(|f| f.toml() + "\n").collect();
        std::fs::write(&file, text).expect("writing functions.toml");
        let mut serve = Command::new(&bins.kindling);
        serve.arg("serve").arg("--functions").arg(&file);
        serve
    }

    /// `kindling run CODE --runtime R --handler H --isolation sandbox`: one function,
    /// emulator style, its log on stdout (see [`Server::stdout`]).
    pub fn run(bins: &Binaries, code: &Path, runtime: &str, handler: &str) -> Self {
        let mut run = Command::new(&bins.kindling);
        run.arg("run")
            .arg(code)
            .args(["--runtime", runtime, "--handler", handler])
            .args(["--isolation", "sandbox"]);
        Self::launch(bins, Scratch::new(), run, "127.0.0.1:0")
    }

    /// Adds the address and state dir to `command`, starts it and waits until it listens.
    fn launch(bins: &Binaries, scratch: Scratch, mut command: Command, addr: &str) -> Self {
        if !command.get_envs().any(|(k, _)| k == "KINDLING_LOG") {
            command.env("KINDLING_LOG", "kindling=info,warn");
        }
        let state_dir = scratch.path().join("state");
        let stderr = scratch.path().join("serve.err");
        let child = command
            .args(["--addr", addr, "--state-dir"])
            .arg(&state_dir)
            .stdin(Stdio::null())
            .stdout(file_for(&scratch.path().join("serve.out")))
            .stderr(file_for(&stderr))
            .spawn()
            .expect("cannot start kindling");
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            state_dir,
            stderr,
            kindling: bins.kindling.clone(),
            _scratch: scratch,
        };
        server.addr = server.wait_listening();
        server
    }

    /// The address from `kindling: serving NAMES on http://ADDR`.
    fn wait_listening(&mut self) -> SocketAddr {
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            // Whole lines only: the server may be midway through writing this one.
            if let Some(addr) = text
                .split_inclusive('\n')
                .filter_map(|l| l.strip_suffix('\n'))
                .find_map(|l| l.strip_prefix("kindling: serving "))
                .and_then(|l| l.rsplit_once(" on http://"))
            {
                return addr.1.parse().expect("a socket address");
            }
            if let Some(status) = self.child.try_wait().expect("waiting for kindling") {
                panic!("kindling serve ended ({status}) before listening:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "kindling serve did not listen within {START_PATIENCE:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The base URL of a function's URL (`http://ADDR/`), from the line
    /// `function URL NAME http://ADDR/` that the server printed at start.
    pub fn function_url(&self, function: &str) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let prefix = format!("function URL {function} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no function URL for {function}:\n{text}"))
            .to_string()
    }

    /// A `RequestResponse` invocation with a JSON event.
    pub async fn invoke(&self, function: &str, event: &Value) -> InvokeResponse {
        self.invoke_with(function, event, &InvokeOptions::default())
            .await
    }

    pub async fn invoke_with(
        &self,
        function: &str,
        event: &Value,
        options: &InvokeOptions,
    ) -> InvokeResponse {
        client::invoke(self.addr, function, event.to_string(), options)
            .await
            .unwrap_or_else(|e| panic!("invoking {function}: {e:#}\n{}", self.diagnostics()))
    }

    /// Runs the `kindling` CLI against this server's address and state dir.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.kindling)
            .args(args)
            .env("KINDLING_ADDR", self.addr.to_string())
            .env("KINDLING_STATE_DIR", &self.state_dir)
            .output()
            .expect("cannot run kindling")
    }

    /// A function's log file as it is now (empty when it has none yet).
    pub fn log(&self, function: &str) -> String {
        std::fs::read_to_string(self.state_dir.join("logs").join(format!("{function}.log")))
            .unwrap_or_default()
    }

    /// The environment dirs that exist now.
    pub fn env_dirs(&self) -> Vec<String> {
        match std::fs::read_dir(self.state_dir.join("envs")) {
            Ok(dir) => dir
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The cgroups of this server's environments that exist now.
    pub fn cgroups(&self) -> Vec<PathBuf> {
        cgroups_of(self.pid())
    }

    /// What the server printed on stdout so far: its functions' log lines.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.stderr.with_file_name("serve.out")).unwrap_or_default()
    }

    /// The server's stderr, for failure messages.
    pub fn diagnostics(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("kindling serve's stderr:\n{text}")
    }

    /// Sends SIGTERM and checks that the server exits cleanly and leaves nothing behind:
    /// no process it started, no environment dir, no cgroup. Returns the processes it
    /// had started (so a test can tell that there was something to clean up).
    pub fn stop(mut self) -> Vec<Proc> {
        let pid = self.pid();
        let started = descendants(pid);
        kill(pid_t(pid), Signal::SIGTERM).expect("sending SIGTERM");
        let status = wait_until(&mut self.child, STOP_PATIENCE)
            .unwrap_or_else(|| panic!("no exit within {STOP_PATIENCE:?} of SIGTERM"));
        assert!(
            status.success(),
            "kindling serve exited {status} on SIGTERM\n{}",
            self.diagnostics()
        );
        let alive: Vec<&Proc> = started.iter().filter(|p| p.is_alive()).collect();
        assert!(alive.is_empty(), "left running: {alive:?}");
        assert_eq!(
            self.env_dirs(),
            Vec::<String>::new(),
            "environment dirs left"
        );
        let cgroups = cgroups_of(pid);
        assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
        started
    }

    /// SIGKILLs the server (no clean-up of its own can run) and reaps it; returns the
    /// processes it had started.
    pub fn kill(mut self) -> Vec<Proc> {
        let started = descendants(self.pid());
        self.child.kill().expect("sending SIGKILL");
        self.child.wait().expect("reaping the server");
        started
    }
}

impl Drop for Server {
    /// A failed test still stops its server (SIGTERM, then SIGKILL).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(pid_t(self.pid()), Signal::SIGTERM);
            if wait_until(&mut self.child, STOP_PATIENCE).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

fn file_for(path: &Path) -> std::fs::File {
    std::fs::File::create(path).expect("creating an output file")
}

fn wait_until(child: &mut Child, patience: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A process, identified by pid and start time so that a reused pid is not mistaken
/// for it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Proc {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
}

impl Proc {
    fn read(pid: u32) -> Option<(Proc, u32)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_string();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the comm: state is field 3 of stat(5), ppid 4, starttime 22.
        let ppid = fields.get(1)?.parse().ok()?;
        let start_time = fields.get(19)?.parse().ok()?;
        Some((
            Proc {
                pid,
                start_time,
                comm,
            },
            ppid,
        ))
    }

    /// Still running (a zombie counts: nobody reaped it).
    pub fn is_alive(&self) -> bool {
        Proc::read(self.pid).is_some_and(|(p, _)| p.start_time == self.start_time)
    }
}

/// Every process below `root`, now.
pub fn descendants(root: u32) -> Vec<Proc> {
    let all: Vec<(Proc, u32)> = std::fs::read_dir("/proc")
        .expect("reading /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter_map(Proc::read)
        .collect();
    let mut found = BTreeSet::from([root]);
    let mut out = Vec::new();
    // Parents may be listed after their children: repeat until nothing new turns up.
    loop {
        let new: Vec<&Proc> = all
            .iter()
            .filter(|(p, ppid)| found.contains(ppid) && !found.contains(&p.pid))
            .map(|(p, _)| p)
            .collect();
        if new.is_empty() {
            return out;
        }
        for p in new {
            found.insert(p.pid);
            out.push(p.clone());
        }
    }
}

/// The sandbox cgroups of the server with this pid, in every hierarchy: the scheduler
/// names environments `<function>-<server pid>-<n>`, the sandbox puts each in
/// `kindling/<that name>`.
fn cgroups_of(server_pid: u32) -> Vec<PathBuf> {
    let marker = format!("-{server_pid}-");
    let root = Path::new("/sys/fs/cgroup");
    let hierarchies = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| Some(e.ok()?.path().join("kindling")))
        .chain([root.join("kindling")]);
    hierarchies
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir() && e.file_name().to_string_lossy().contains(&marker))
        .map(|e| e.path())
        .collect()
}

/// Waits (15 s at most) until `check` holds, e.g. for a line that is printed or
/// logged after the answer that caused it.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The body as JSON, or a panic that shows it.
pub fn json(response: &InvokeResponse) -> Value {
    serde_json::from_slice(&response.body).unwrap_or_else(|e| {
        panic!(
            "{}: body is not JSON ({e}): {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        )
    })
}

/// `x-amzn-requestid`, which the Invoke API sets on every answer.
pub fn request_id(response: &InvokeResponse) -> String {
    response
        .headers
        .get("x-amzn-requestid")
        .and_then(|v| v.to_str().ok())
        .expect("x-amzn-requestid")
        .to_string()
}

/// A process id as the kernel's `pid_t`.
fn pid_t(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("a pid fits pid_t"))
}
