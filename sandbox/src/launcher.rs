//! [`SandboxLauncher`]: the host side of the sandbox. It decides everything (paths,
//! limits, init's configuration), writes the [`Plan`], and runs the single-threaded
//! `kindling-sandbox-exec` helper, which does the forking and mounting.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use async_trait::async_trait;
use kindling_images::{write_shims, Runtime, COMPILED_SHIMS_DIR};
use kindling_network::{Lease, Network};
use kindling_plumbing::ids::{IdLease, IdPool};
use kindling_runtime_api::environment::{
    Environment, EnvironmentSpec, Freezer, Launcher, Network as FunctionNetwork, StartPhases,
    StopMode,
};
use kindling_wire::{monotonic_ns, HostAddr, ENV_HOST_ADDR};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{geteuid, Pid};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::cgroup::{Cgroup, Limits};
use crate::plan::{
    Entries, IdMap, Plan, GUEST_HOST_SOCKET, GUEST_RUNTIME_DIR, STATUS_ERROR, STATUS_EXITED,
    STATUS_READY,
};

/// The helper's binary name, looked up beside the running program.
pub const EXEC_NAME: &str = "kindling-sandbox-exec";
/// Overrides where the helper is found.
pub const ENV_EXEC: &str = "KINDLING_SANDBOX_EXEC";
/// The host directories that make up the root while no runtime image directory is given.
pub const HOST_ROOT_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib64", "etc"];
/// Top-level names the sandbox mounts itself; an image's own entries of these are ignored.
const RESERVED_ROOT_NAMES: &[&str] = &["var", "tmp", "dev", "proc", "sys", "run"];
/// How long killed processes and their cgroup get to disappear.
const CLEANUP_PATIENCE: Duration = Duration::from_secs(5);
/// Longest hostname Linux accepts (`HOST_NAME_MAX`).
const HOST_NAME_MAX: usize = 64;

/// Ids one sandbox's user namespace maps (0..65536 inside, as a container's).
const SANDBOX_IDS: u32 = 65_536;
/// The host ids of the first sandbox's range: far above a distribution's users, the
/// usual `/etc/subuid` ranges (from 100000) and the microVMs' users (900000..904096).
const SANDBOX_ID_BASE: u32 = 0x1000_0000;
/// Which ranges running sandboxes hold: range `n` starts at
/// `SANDBOX_ID_BASE + n * SANDBOX_IDS`.
static SANDBOX_RANGES: IdPool = IdPool::new("sandbox-ranges", 0..4096);

/// The host ids of a sandbox, held while it runs.
fn id_range() -> Result<(IdLease, IdMap)> {
    let lease = SANDBOX_RANGES
        .take()
        .map_err(|e| anyhow!("sandbox id ranges: {e}"))?;
    let map = IdMap {
        host_base: SANDBOX_ID_BASE + lease.id() * SANDBOX_IDS,
        count: SANDBOX_IDS,
    };
    Ok((lease, map))
}

/// How sandboxes are built; the defaults suit production.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// A runtime image directory to use as the root (read-only); `None` = read-only
    /// views of the host's [`HOST_ROOT_DIRS`].
    pub root: Option<PathBuf>,
    /// Where the static `init` and `kindling-bootstrap` are; `None` =
    /// [`kindling_images::locate::guest_bin_dir`].
    pub guest_bin_dir: Option<PathBuf>,
    /// The `kindling-sandbox-exec` helper; `None` = [`ENV_EXEC`], else beside the
    /// running program (or one folder up, for cargo's `deps/`).
    pub exec: Option<PathBuf>,
    pub pids_limit: u32,
    pub tmp_size_mb: u32,
    /// The cgroup (under each hierarchy's root) that holds one cgroup per sandbox.
    pub cgroup_parent: String,
    /// Merged over the init configuration the launcher writes (objects merge key by
    /// key, anything else replaces), e.g. `{"bootstrap": "/var/task/probe"}` in tests.
    pub init_config: Map<String, Value>,
    /// How long the helper may take to report that init runs.
    pub start_timeout: Duration,
    /// The host's networking for environments; `None`: no sandbox gets a network.
    pub network: Option<Arc<Network>>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            root: None,
            guest_bin_dir: None,
            exec: None,
            pids_limit: 1024,
            tmp_size_mb: 512,
            cgroup_parent: "kindling".to_string(),
            init_config: Map::new(),
            start_timeout: Duration::from_secs(10),
            network: None,
        }
    }
}

/// Starts functions as PID 1 of fresh namespaces on the host (name `sandbox`).
#[derive(Debug, Clone, Default)]
pub struct SandboxLauncher {
    options: SandboxOptions,
}

impl SandboxLauncher {
    pub fn new(options: SandboxOptions) -> Self {
        Self { options }
    }

    /// Like [`Launcher::start`], returning the concrete environment.
    pub async fn start_sandbox(&self, spec: &EnvironmentSpec) -> Result<SandboxEnvironment> {
        let begun_ns = monotonic_ns();
        if !geteuid().is_root() {
            bail!(
                "the sandbox needs root to create namespaces, mounts and cgroups (running as uid {})",
                geteuid()
            );
        }
        let exec = self.exec_path()?;
        let bin_dir = match &self.options.guest_bin_dir {
            Some(dir) => dir.clone(),
            None => kindling_images::locate::guest_bin_dir().map_err(|e| anyhow!(e))?,
        };
        let init = existing_file(&bin_dir.join("init"))?;
        let bootstrap = existing_file(&bin_dir.join("kindling-bootstrap"))?;
        let host_socket = spec.runtime_api_socket();
        if !host_socket.exists() {
            bail!(
                "the Runtime API socket {} does not exist: bind it before starting the sandbox",
                host_socket.display()
            );
        }
        let task = &spec.function.code;
        if !task.is_dir() {
            bail!("the function's code {} is not a directory", task.display());
        }
        let mut root = self.root_entries()?;
        // The function's layers, merged into one folder when it was readied, are its /opt.
        if let Some(opt) = spec.function.layers.first() {
            if !opt.is_dir() {
                bail!(
                    "the function's layers {} are not a directory",
                    opt.display()
                );
            }
            root.insert("opt".to_string(), opt.clone());
        }
        searchable_by_others(&spec.dir)?;
        let (ids, id_map) = id_range()?;
        let lease = match (&self.options.network, spec.function.network) {
            (Some(network), FunctionNetwork::Outbound) => Some(network.lease()?),
            _ => None,
        };

        // From here on, a failure must undo what was made.
        let staging = spec.dir.join("root");
        let made = fs::create_dir_all(&staging)
            .with_context(|| format!("creating {}", staging.display()))
            .and_then(|()| {
                let shims = spec.dir.join("runtime");
                let compiled = self
                    .options
                    .root
                    .as_ref()
                    .map(|r| r.join(COMPILED_SHIMS_DIR));
                runtime_entries(&spec.function.runtime, bootstrap, &shims, compiled)
            });
        let runtime = match made {
            Ok(runtime) => runtime,
            Err(err) => {
                let _ = fs::remove_dir_all(&spec.dir);
                return Err(err);
            }
        };
        let cgroup = Cgroup::create(
            &self.options.cgroup_parent,
            &spec.id,
            Limits {
                memory_bytes: u64::from(spec.function.memory_mb) << 20,
                pids: self.options.pids_limit,
            },
        );
        let cgroup = match cgroup {
            Ok(cgroup) => cgroup,
            Err(err) => {
                let _ = fs::remove_dir_all(&spec.dir);
                return Err(err.context("creating the sandbox's cgroup"));
            }
        };
        let launched = self
            .launch(
                spec,
                &exec,
                &cgroup,
                lease.as_ref(),
                Plan {
                    staging,
                    root,
                    runtime,
                    task: task.clone(),
                    host_socket,
                    init,
                    init_config: spec.dir.join("init.json"),
                    hostname: hostname(&spec.function.name),
                    tmp_size_mb: self.options.tmp_size_mb,
                    cgroup_procs: cgroup.procs_files(),
                    id_map,
                    delegate: cgroup.v2_dirs(),
                    host_pid: std::process::id(),
                },
            )
            .await;
        match launched {
            Ok(Started {
                helper,
                status,
                init,
                init_started_ns,
            }) => {
                // init runs from there: the set-up before it is the sandbox's own phase.
                let mut sandbox = SandboxEnvironment {
                    setup: Duration::from_nanos(init_started_ns.saturating_sub(begun_ns)),
                    init_started_ns,
                    id: spec.id.clone(),
                    dir: spec.dir.clone(),
                    console: spec.console_log(),
                    helper,
                    status,
                    init,
                    cgroup,
                    exit_reason: None,
                    _ids: ids,
                    network: lease,
                };
                // init waits for its interface; the veth can only go into its network
                // namespace once that exists.
                if let Some(lease) = &sandbox.network {
                    let pid = u32::try_from(init.as_raw()).context("init's pid")?;
                    if let Err(err) = lease.veth_into(pid).await {
                        let _ = sandbox.stop(StopMode::Kill).await;
                        return Err(err.context("the sandbox's network"));
                    }
                }
                Ok(sandbox)
            }
            Err(err) => {
                // Nothing of a failed start may stay behind (the error quotes the console).
                let _ = cgroup.kill_all(CLEANUP_PATIENCE).await;
                let _ = cgroup.remove(CLEANUP_PATIENCE).await;
                let _ = fs::remove_dir_all(&spec.dir);
                Err(err)
            }
        }
    }

    /// Writes the plan and init's configuration, runs the helper and waits for `ready`.
    async fn launch(
        &self,
        spec: &EnvironmentSpec,
        exec: &Path,
        cgroup: &Cgroup,
        network: Option<&Lease>,
        plan: Plan,
    ) -> Result<Started> {
        let config = self.init_config(&plan.hostname, network);
        write_json(&plan.init_config, &config)?;
        let plan_path = spec.dir.join("sandbox.json");
        write_json(&plan_path, &plan)?;
        let console = OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.console_log())
            .with_context(|| format!("opening {}", spec.console_log().display()))?;

        // No `pre_exec`: without one the child is made by posix_spawn (vfork), not by a
        // fork that copies this large, many-threaded process's page tables (3.6-19 ms
        // measured here, the largest part of Sandbox Setup). The helper makes itself die
        // with this process (see `Plan::host_pid`).
        let mut command = Command::new(exec);
        command
            .arg(&plan_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(console)
            // A dropped environment takes its helper, and with it init (PDEATHSIG), along.
            .kill_on_drop(true);
        let mut helper = command
            .spawn()
            .with_context(|| format!("running {}", exec.display()))?;
        let stdout = helper.stdout.take().expect("stdout is piped");
        let mut status = BufReader::new(stdout).lines();

        let first = tokio::time::timeout(self.options.start_timeout, status.next_line()).await;
        let line = match first {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Ok(Err(_)) => {
                let code = helper.wait().await?;
                bail!(
                    "{} ended before reporting ({code}); console: {}",
                    exec.display(),
                    console_tail(&spec.console_log())
                );
            }
            Err(_) => bail!(
                "the sandbox did not start within {:?}; console: {}",
                self.options.start_timeout,
                console_tail(&spec.console_log())
            ),
        };
        let (word, detail) = line.split_once(' ').unwrap_or((&line, ""));
        match word {
            STATUS_READY => {
                let bad = || format!("bad status line from the helper: {line:?}");
                let (pid, stamp) = detail.split_once(' ').with_context(bad)?;
                let pid = pid.parse().with_context(bad)?;
                let init_started_ns = stamp.parse().with_context(bad)?;
                tracing::debug!(id = %spec.id, pid, cgroup = ?cgroup.dirs(), "sandbox started");
                Ok(Started {
                    helper,
                    status,
                    init: Pid::from_raw(pid),
                    init_started_ns,
                })
            }
            STATUS_ERROR => {
                let _ = helper.wait().await;
                bail!(
                    "starting the sandbox: {detail}; console: {}",
                    console_tail(&spec.console_log())
                )
            }
            _ => bail!("bad status line from the helper: {line:?}"),
        }
    }

    fn exec_path(&self) -> Result<PathBuf> {
        if let Some(path) = self
            .options
            .exec
            .clone()
            .or_else(|| std::env::var_os(ENV_EXEC).map(PathBuf::from))
        {
            return existing_file(&path);
        }
        let exe = std::env::current_exe().context("locating the running program")?;
        exe.ancestors()
            .skip(1)
            .take(2)
            .map(|dir| dir.join(EXEC_NAME))
            .find(|path| path.is_file())
            .ok_or_else(|| {
                anyhow!(
                    "{EXEC_NAME} is not beside {}: build it (cargo build -p kindling-sandbox) or set {ENV_EXEC}",
                    exe.display()
                )
            })
    }

    /// The root's top-level entries: the image directory's, or the host's system dirs.
    fn root_entries(&self) -> Result<Entries> {
        match &self.options.root {
            None => Ok(HOST_ROOT_DIRS
                .iter()
                .map(|name| (name.to_string(), Path::new("/").join(name)))
                .filter(|(_, path)| path.symlink_metadata().is_ok())
                .collect()),
            Some(image) => {
                let mut entries = dir_entries(image)?;
                entries.retain(|name, _| !RESERVED_ROOT_NAMES.contains(&name.as_str()));
                Ok(entries)
            }
        }
    }

    /// init's configuration: the sandbox's, its network's keys, then the overrides.
    fn init_config(&self, hostname: &str, network: Option<&Lease>) -> Value {
        let host = HostAddr::Unix(PathBuf::from(GUEST_HOST_SOCKET)).to_string();
        let mut config = json!({
            "sandbox": true,
            "hostname": hostname,
            "bootstrap": format!("{GUEST_RUNTIME_DIR}/kindling-bootstrap"),
            "bootstrap_args": [],
            "env": { ENV_HOST_ADDR: host },
            // No /dev/console here: init keeps the stdout/stderr it was given, the console log.
            "console": "",
        });
        if let Some(lease) = network {
            merge(&mut config, &Value::Object(lease.init_json()));
        }
        merge(
            &mut config,
            &Value::Object(self.options.init_config.clone()),
        );
        config
    }
}

#[async_trait]
impl Launcher for SandboxLauncher {
    fn name(&self) -> &str {
        "sandbox"
    }

    async fn start(&self, spec: &EnvironmentSpec) -> Result<Box<dyn Environment>> {
        Ok(Box::new(self.start_sandbox(spec).await?))
    }

    fn remove_orphan(&self, id: &str) {
        match Cgroup::remove_leftover(&self.options.cgroup_parent, id) {
            Ok(()) => {}
            Err(e) => tracing::warn!(env = id, "a dead server's sandbox cgroup: {e}"),
        }
    }
}

/// One running sandbox. [`Environment::stop`] removes everything it made; dropping it
/// unstopped still kills it (the helper is killed, init follows by its parent-death
/// signal, and its namespaces and mounts vanish with it) but leaves its cgroup and
/// directory behind.
#[derive(Debug)]
pub struct SandboxEnvironment {
    id: String,
    dir: PathBuf,
    console: PathBuf,
    /// The `kindling-sandbox-exec` helper, init's parent.
    helper: Child,
    /// The helper's remaining status lines (`exited <reason>`).
    status: Lines<BufReader<ChildStdout>>,
    /// Init, as seen from the host.
    init: Pid,
    cgroup: Cgroup,
    exit_reason: Option<String>,
    /// The host ids its user namespace maps, held until it is gone.
    _ids: IdLease,
    /// Its address block, held until it is gone.
    network: Option<Lease>,
    /// Its start until init ran: id range, cgroup, namespaces and mounts (`Sandbox Setup`).
    setup: Duration,
    /// When init ran, on [`monotonic_ns`], the clock the sandbox shares with the host.
    init_started_ns: u64,
}

impl SandboxEnvironment {
    /// The host PID of the sandbox's init (PID 1 inside).
    pub fn init_pid(&self) -> Pid {
        self.init
    }

    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    fn helper_running(&mut self) -> bool {
        matches!(self.helper.try_wait(), Ok(None))
    }

    /// Signals init while its parent, the helper, still runs: only then can the PID not
    /// have been reaped and reused.
    fn signal_init(&mut self, signal: Signal) {
        if self.helper_running() {
            let _ = kill(self.init, signal);
        }
    }
}

#[async_trait]
impl Environment for SandboxEnvironment {
    fn id(&self) -> &str {
        &self.id
    }

    fn is_alive(&mut self) -> bool {
        self.exit_reason.is_none() && self.helper_running()
    }

    async fn exited(&mut self) -> String {
        if let Some(reason) = &self.exit_reason {
            return reason.clone();
        }
        // `next_line` is cancel-safe, so this may sit in a `select!`.
        let line = self.status.next_line().await;
        let helper = self.helper.wait().await;
        let reason = match (line, helper) {
            (Ok(Some(line)), _) => line
                .strip_prefix(STATUS_EXITED)
                .map_or(line.clone(), |r| r.trim_start().to_string()),
            (_, Ok(status)) => format!("the sandbox helper ended ({status})"),
            (_, Err(e)) => format!("waiting for the sandbox helper: {e}"),
        };
        self.exit_reason = Some(reason.clone());
        reason
    }

    async fn stop(&mut self, mode: StopMode) -> io::Result<()> {
        if let StopMode::Graceful(grace) = mode {
            // Init forwards SIGTERM to bootstrap and shuts down by itself.
            self.signal_init(Signal::SIGTERM);
            let _ = tokio::time::timeout(grace, self.helper.wait()).await;
        }
        // Killing PID 1 kills its whole PID namespace, and the helper reaps it and exits;
        // killing the helper first would leave init a zombie for the host to reap.
        self.signal_init(Signal::SIGKILL);
        let _ = tokio::time::timeout(CLEANUP_PATIENCE, self.helper.wait()).await;
        // Whatever still runs in the cgroup (nothing, unless the helper hung) goes too.
        let killed = self.cgroup.kill_all(CLEANUP_PATIENCE).await;
        let reaped = self.helper.wait().await.map(drop);
        let removed = self.cgroup.remove(CLEANUP_PATIENCE).await;
        if let Some(lease) = &self.network {
            if let Err(e) = lease.remove_link().await {
                tracing::warn!(id = %self.id, "removing the sandbox's veth: {e:#}");
            }
        }
        let cleaned = match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io::Error::new(
                e.kind(),
                format!("removing {}: {e}", self.dir.display()),
            )),
            _ => Ok(()),
        };
        killed.and(reaped).and(removed).and(cleaned)
    }

    fn console_log(&self) -> Option<&Path> {
        Some(&self.console)
    }

    /// Namespaces, mounts and the rest of the host's part, until init runs.
    fn start_phases(&self) -> StartPhases {
        vec![("Sandbox Setup", self.setup)]
    }

    fn init_started_ns(&self) -> Option<u64> {
        Some(self.init_started_ns)
    }

    fn freezer(&self) -> Option<Arc<dyn Freezer>> {
        let freezer = self.cgroup.freezer();
        if freezer.is_none() {
            tracing::debug!(id = %self.id, "no cgroup v2 freezer: the sandbox is not frozen while idle");
        }
        Some(Arc::new(freezer?))
    }

    fn memory_peak_mb(&self) -> Option<u64> {
        const MIB: u64 = 1024 * 1024;
        self.cgroup
            .memory_peak_bytes()
            .map(|bytes| bytes.div_ceil(MIB))
    }
}

/// A helper that reported init running.
struct Started {
    helper: Child,
    /// The helper's further status lines (`exited`).
    status: Lines<BufReader<ChildStdout>>,
    init: Pid,
    /// When init was started, on [`monotonic_ns`] (the helper's stamp).
    init_started_ns: u64,
}

/// The entries of `/var/runtime`: the runtime's shims (if it ships any), written into
/// `dir` from the copy compiled into kindling-images, bootstrap, and the root image's
/// compiled shims (`compiled`, where the image has them).
fn runtime_entries(
    runtime: &str,
    bootstrap: PathBuf,
    dir: &Path,
    compiled: Option<PathBuf>,
) -> Result<Entries> {
    let shims = runtime.parse::<Runtime>().map_or(&[][..], Runtime::shims);
    write_shims(shims, dir)?;
    let mut entries: Entries = shims
        .iter()
        .map(|shim| (shim.name.to_string(), dir.join(shim.name)))
        .collect();
    entries.insert("kindling-bootstrap".to_string(), bootstrap);
    if let Some(compiled) = compiled.filter(|c| !shims.is_empty() && c.is_dir()) {
        let name = compiled.file_name().context("a compiled shims folder")?;
        entries.insert(name.to_string_lossy().into_owned(), compiled);
    }
    Ok(entries)
}

/// Every entry of `dir`, by name.
fn dir_entries(dir: &Path) -> Result<Entries> {
    let read = || -> io::Result<Entries> {
        fs::read_dir(dir)?
            .map(|entry| {
                let entry = entry?;
                Ok((
                    entry.file_name().to_string_lossy().into_owned(),
                    entry.path(),
                ))
            })
            .collect()
    };
    read().with_context(|| format!("reading {}", dir.display()))
}

/// The sandbox's root builds the guest root under `dir` as an unprivileged host user: every
/// folder on the way there must let others search it.
fn searchable_by_others(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for folder in dir.ancestors().skip(1) {
        let Ok(meta) = fs::metadata(folder) else {
            continue;
        };
        if meta.permissions().mode() & 0o001 == 0 {
            bail!(
                "{} is not searchable by others, and the sandbox's root is an unprivileged \
                 user on the host: use a state directory outside it (the default /run/kindling is)",
                folder.display()
            );
        }
    }
    Ok(())
}

fn existing_file(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        bail!("{} does not exist or is not a file", path.display())
    }
}

/// The function's name as a hostname, cut to what Linux accepts.
fn hostname(function: &str) -> String {
    let mut name = function.to_string();
    while name.len() > HOST_NAME_MAX {
        name.pop();
    }
    name
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_vec_pretty(value)?;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Merges `overrides` into `base`: objects key by key, anything else replaces.
fn merge(base: &mut Value, overrides: &Value) {
    match (base, overrides) {
        (Value::Object(base), Value::Object(overrides)) => {
            for (key, value) in overrides {
                merge(base.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
        (base, value) => *base = value.clone(),
    }
}

/// The last lines of the console, for an error message.
fn console_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    match &lines[lines.len().saturating_sub(5)..] {
        [] => "(empty)".to_string(),
        tail => tail.join(" | "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_merge_into_init_config() {
        let overrides = json!({"bootstrap": "/var/task/probe", "env": {"A": "1"}});
        let options = SandboxOptions {
            init_config: overrides.as_object().cloned().unwrap(),
            ..SandboxOptions::default()
        };
        let config = SandboxLauncher::new(options).init_config("fn", None);
        assert_eq!(config["bootstrap"], "/var/task/probe");
        assert_eq!(config["env"]["A"], "1");
        assert_eq!(
            config["env"][ENV_HOST_ADDR],
            "unix:///run/kindling/host.sock"
        );
        assert_eq!(config["hostname"], "fn");
        assert_eq!(config["sandbox"], true);
    }

    #[test]
    fn var_runtime_holds_the_written_shims_and_bootstrap() {
        let dir = tempfile::tempdir().unwrap();
        let bootstrap = PathBuf::from("/bin/kindling-bootstrap");
        let shims = dir.path().join("runtime");
        let image = dir.path().join("image");
        let compiled = image.join(COMPILED_SHIMS_DIR);
        // An image without compiled shims: they are left out.
        let entries =
            runtime_entries("python", bootstrap.clone(), &shims, Some(compiled.clone())).unwrap();
        let names: Vec<&str> = entries.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["bootstrap", "kindling-bootstrap", "kindling_runtime.py"]
        );
        fs::create_dir_all(&compiled).unwrap();
        let entries =
            runtime_entries("python", bootstrap.clone(), &shims, Some(compiled.clone())).unwrap();
        assert_eq!(entries["__pycache__"], compiled);
        assert_eq!(entries["kindling-bootstrap"], bootstrap);
        let shim = fs::read_to_string(&entries["kindling_runtime.py"]).unwrap();
        assert!(entries["kindling_runtime.py"].starts_with(&shims));
        assert!(shim.contains("def "), "{shim}");
        for custom in ["provided", "provided-debian", "no-such-runtime"] {
            let entries =
                runtime_entries(custom, bootstrap.clone(), &shims, Some(compiled.clone())).unwrap();
            assert_eq!(entries.keys().collect::<Vec<_>>(), ["kindling-bootstrap"]);
        }
    }

    #[test]
    fn hostnames_fit_linux() {
        assert_eq!(hostname(&"x".repeat(70)).len(), HOST_NAME_MAX);
        assert_eq!(hostname("hello"), "hello");
    }
}
