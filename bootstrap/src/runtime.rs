//! Finding, starting, watching and restarting the function's runtime process.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kindling_plumbing::cgroup::Joiner;
use kindling_plumbing::seccomp;
use kindling_wire::{FunctionEnvironment, RuntimeUser};
use nix::sys::prctl;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

use crate::agent::Agent;
use crate::config::Config;
use crate::memory::{MemoryProbe, ProcTree, RuntimeCgroup};
use crate::privileges;
use crate::telemetry::Category;

/// How long a runtime gets to exit after SIGTERM when the guest shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
/// How long its last log lines may take to reach the host then.
const SHUTDOWN_LOG_FLUSH: Duration = Duration::from_secs(1);
/// Longest pause between restarts of a runtime that keeps dying before its first `/next`.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(5);

/// What is started, with what environment, where.
pub struct RuntimeSpec {
    pub program: PathBuf,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// `/var/runtime`: a `program` in it is a shipped runtime, which a wrapper may wrap.
    pub runtime_dir: PathBuf,
    /// Whom it runs as (see [`privileges::drop_to`]); `None`: as the agent.
    pub user: Option<RuntimeUser>,
}

/// The first executable `bootstrap` of the function, its layers, then the shipped runtime.
pub fn locate(config: &Config) -> Result<PathBuf, String> {
    let candidates =
        [&config.task_root, &config.opt_root, &config.runtime_dir].map(|dir| dir.join("bootstrap"));
    candidates
        .iter()
        .find(|p| is_executable(p))
        .cloned()
        .ok_or_else(|| {
            let list: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            format!("Couldn't find valid bootstrap(s): [{}]", list.join(" "))
        })
}

pub fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Lambda's variable naming a wrapper script for the shipped runtimes.
const EXEC_WRAPPER: &str = "AWS_LAMBDA_EXEC_WRAPPER";

/// Variables the function's configuration may not override.
const RESERVED: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_LAMBDA_RUNTIME_API",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
];

/// The runtime's whole environment (nothing of the bootstrap's own leaks in): defaults the
/// function may override, its variables, then the reserved ones.
pub fn environment(
    f: &FunctionEnvironment,
    config: &Config,
    api: SocketAddr,
) -> Vec<(String, String)> {
    let task = config.task_root.display().to_string();
    let runtime = config.runtime_dir.display().to_string();
    let mut env = BTreeMap::from([
        (
            "PATH".to_owned(),
            "/usr/local/bin:/usr/bin:/bin:/opt/bin".to_owned(),
        ),
        (
            "LD_LIBRARY_PATH".to_owned(),
            format!("/lib64:/usr/lib64:{runtime}:{runtime}/lib:{task}:{task}/lib:/opt/lib"),
        ),
        ("LANG".to_owned(), "en_US.UTF-8".to_owned()),
        ("TZ".to_owned(), "UTC".to_owned()),
    ]);
    for (key, value) in &f.variables {
        if RESERVED.contains(&key.as_str()) {
            say!("function variable {key} is reserved; ignored");
        } else {
            env.insert(key.clone(), value.clone());
        }
    }
    let reserved = [
        ("_HANDLER", f.handler.clone()),
        ("AWS_REGION", f.region.clone()),
        ("AWS_DEFAULT_REGION", f.region.clone()),
        ("AWS_EXECUTION_ENV", format!("AWS_Lambda_{}", f.runtime)),
        ("AWS_LAMBDA_FUNCTION_NAME", f.function_name.clone()),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", f.memory_mb.to_string()),
        ("AWS_LAMBDA_FUNCTION_VERSION", f.function_version.clone()),
        (
            "AWS_LAMBDA_INITIALIZATION_TYPE",
            f.initialization_type.clone(),
        ),
        ("AWS_LAMBDA_LOG_GROUP_NAME", f.log_group_name.clone()),
        ("AWS_LAMBDA_LOG_STREAM_NAME", f.log_stream_name.clone()),
        ("AWS_LAMBDA_RUNTIME_API", api.to_string()),
        ("LAMBDA_TASK_ROOT", task),
        ("LAMBDA_RUNTIME_DIR", runtime),
    ];
    // A SnapStart function's runtime gets no log group or stream (they would name the
    // environment that took the snapshot in every clone): the host sends them empty.
    env.extend(
        reserved
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_owned(), v)),
    );
    env.into_iter().collect()
}

/// One started runtime and what must be cleaned up after it.
struct Started {
    child: Child,
    pgid: Pid,
    memory: Arc<MemoryProbe>,
}

/// A command that runs `program args` as the function's code runs: the function's
/// environment and working directory, `stdout`/`stderr` into the function log, its own
/// process group (so that what it leaves behind can be killed with it), killed if the
/// agent dies, as the runtime's user under its seccomp filters, in `cgroup` when given.
/// The runtime and the external extensions are started this way.
pub fn confined(
    spec: &RuntimeSpec,
    program: &Path,
    args: &[String],
    output: (OwnedFd, OwnedFd),
    joiner: Option<Joiner>,
) -> Result<Command, String> {
    let filters = match spec.user {
        Some(_) => Some(seccomp::denylist_filters()?),
        None => None,
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(output.0))
        .stderr(Stdio::from(output.1))
        .process_group(0)
        .kill_on_drop(true);
    let user = spec.user;
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: prctl(2), `Joiner::join` (one write(2) to a
    // file opened before the fork), the id and capability calls of `drop_to` and
    // seccomp(2) of filters built before the fork; nothing allocates or takes a lock.
    unsafe {
        cmd.pre_exec(move || {
            // A child must not outlive a bootstrap that was killed outright.
            prctl::set_pdeathsig(Signal::SIGKILL)?;
            // "0" moves the calling process into the cgroup before the program runs, so
            // every page it ever touches is charged there (as root, before the drop).
            if let Some(joiner) = &joiner {
                joiner.join()?;
            }
            if let Some(user) = user {
                privileges::drop_to(user)?;
                if let Some(filters) = &filters {
                    seccomp::apply(filters)?;
                }
                // A change of credentials clears the parent-death signal: set it again.
                prctl::set_pdeathsig(Signal::SIGKILL)?;
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// The program that starts the runtime and its arguments: `spec.program`, or, for the
/// shipped runtimes, the function's `AWS_LAMBDA_EXEC_WRAPPER` with the runtime's command
/// line as its arguments (Lambda's wrapper scripts; a custom `bootstrap` is run as is).
fn command_line(spec: &RuntimeSpec, runtime_dir: &Path) -> (PathBuf, Vec<String>) {
    let wrapper = spec
        .env
        .iter()
        .find(|(k, _)| k == EXEC_WRAPPER)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty());
    match wrapper {
        Some(wrapper) if spec.program.starts_with(runtime_dir) => (
            PathBuf::from(wrapper),
            vec![spec.program.display().to_string()],
        ),
        _ => (spec.program.clone(), Vec::new()),
    }
}

fn spawn(agent: &Agent, spec: &RuntimeSpec, generation: u64) -> Result<Started, String> {
    let (program, args) = command_line(spec, &spec.runtime_dir);
    let fail = |e: std::io::Error| format!("cannot start {}: {e}", program.display());
    let cgroup = RuntimeCgroup::create(&format!(
        "kindling-runtime-{}-{generation}",
        std::process::id()
    ));
    let output = (
        agent.logs.pipe(Category::Function).map_err(fail)?,
        agent.logs.pipe(Category::Function).map_err(fail)?,
    );
    let joiner = cgroup.as_ref().map(RuntimeCgroup::joiner);
    let mut cmd = confined(spec, &program, &args, output, joiner)?;
    let started = Instant::now();
    let child = cmd.spawn().map_err(fail)?;
    drop(cmd); // closes our copies of the pipes' write ends
    let pid = child.id().expect("a just-spawned child has a pid");
    // Linux pids are at most 2^22; a child it could not signal is not started.
    let pgid = i32::try_from(pid).map(Pid::from_raw).map_err(|_| {
        format!(
            "cannot start {}: pid {pid} does not fit pid_t",
            program.display()
        )
    })?;
    let probe = Arc::new(match cgroup {
        Some(cg) => MemoryProbe::Cgroup(cg),
        None => MemoryProbe::ProcTree(ProcTree::new(pid)),
    });
    agent.runtime_started(started, probe.clone());
    Ok(Started {
        child,
        pgid,
        memory: probe,
    })
}

impl Started {
    /// Kills whatever the runtime left behind in its process group.
    fn kill_leftovers(&self) {
        let _ = killpg(self.pgid, Signal::SIGKILL);
    }

    /// Removes the runtime's cgroup, killing what escaped its process group.
    async fn remove_cgroup(&self) {
        if let MemoryProbe::Cgroup(cg) = &*self.memory {
            cg.remove().await;
        }
    }
}

fn split_status(status: ExitStatus) -> (Option<i32>, Option<i32>) {
    (status.code(), status.signal())
}

/// Runs the runtime for as long as the bootstrap lives: restarts it whenever it exits
/// (after reporting the exit), and stops it, with the extensions, when the guest shuts
/// down (SIGTERM/SIGINT) or the agent resets the environment (an error then).
pub async fn supervise(agent: Arc<Agent>, spec: RuntimeSpec) -> Result<(), String> {
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;
    let mut delay = Duration::ZERO;
    let mut generation = 0u64;
    loop {
        generation += 1;
        let mut started = spawn(&agent, &spec, generation)?;
        let status = tokio::select! {
            status = started.child.wait() => status.map_err(|e| format!("waiting for the runtime: {e}"))?,
            _ = term.recv() => return shut_down(&agent, started, SPINDOWN).await,
            _ = int.recv() => return shut_down(&agent, started, SPINDOWN).await,
            reason = agent.reset_requested() => {
                shut_down(&agent, started, &reason).await?;
                return Err(format!("environment reset: {reason}"));
            }
        };
        started.kill_leftovers();
        let (code, sig) = split_status(status);
        let reached_next = agent.runtime_exited(code, sig).await;
        started.remove_cgroup().await;
        if reached_next {
            delay = Duration::ZERO;
        } else {
            // Dying during init again and again: do not spin.
            delay = (delay * 2).clamp(Duration::from_millis(100), MAX_RESTART_DELAY);
            tokio::time::sleep(delay).await;
        }
    }
}

/// Lambda's shutdown reason when an idle environment is retired.
const SPINDOWN: &str = "spindown";

/// Stops the runtime (SIGTERM, a grace, SIGKILL) while the extensions get their
/// `SHUTDOWN` event (`reason`) and their time to act on it, then forwards the last log
/// lines and telemetry.
async fn shut_down(agent: &Agent, mut started: Started, reason: &str) -> Result<(), String> {
    say!("shutting down the runtime");
    let runtime = async {
        let _ = killpg(started.pgid, Signal::SIGTERM);
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, started.child.wait()).await;
        started.kill_leftovers();
        started.remove_cgroup().await;
    };
    tokio::join!(runtime, agent.extensions.shut_down(reason));
    // The host may be gone already: its last lines are worth a short wait, no more.
    let flushed = tokio::time::timeout(SHUTDOWN_LOG_FLUSH, async {
        tokio::join!(agent.logs.finish_invocation(), agent.telemetry.flush())
    });
    if flushed.await.is_err() {
        say!("the last log lines could not be forwarded");
    }
    Ok(())
}
