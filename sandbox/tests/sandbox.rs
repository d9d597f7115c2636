//! Real sandboxes: real namespaces, mounts and cgroups (root only), with the guest's
//! real `init` (built by `scripts/build-guest.sh`) starting `tests/probe/probe.py` as
//! its bootstrap. The probe reports what it sees over the host socket.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kindling_runtime_api::environment::{
    Environment, EnvironmentSpec, Function, Isolation, Launcher, StopMode,
};
use kindling_sandbox::{SandboxEnvironment, SandboxLauncher, SandboxOptions};
use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::{geteuid, Pid};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixListener;

const PROBE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/probe/probe.py");
const EXEC: &str = env!("CARGO_BIN_EXE_kindling-sandbox-exec");

/// One sandbox under test, with the host end of its Runtime API socket.
struct Harness {
    _tmp: TempDir,
    spec: EnvironmentSpec,
    listener: UnixListener,
    launcher: SandboxLauncher,
}

/// Why these tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    if !geteuid().is_root() {
        return Some("the sandbox needs root".into());
    }
    kindling_images::locate::guest_bin_dir().err()
}

/// What the probe does besides reporting (see `tests/probe/probe.py`).
struct Probe {
    alloc_mb: u32,
    spawn: u32,
    then: &'static str,
}

const JUST_WAIT: Probe = Probe {
    alloc_mb: 0,
    spawn: 0,
    then: "wait",
};

/// A sandbox whose bootstrap is the probe; `None` (after one SKIPPED line) when this
/// machine cannot run sandboxes.
fn harness(test: &str, memory_mb: u32, pids_limit: u32, probe: Probe) -> Option<Harness> {
    if let Some(reason) = skip_reason() {
        println!("SKIPPED: {test}: {reason}");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let code = tmp.path().join("code");
    std::fs::create_dir(&code).unwrap();
    std::fs::copy(PROBE, code.join("probe.py")).unwrap();
    std::fs::set_permissions(code.join("probe.py"), PermissionsExt::from_mode(0o755)).unwrap();

    let id = format!("{test}-{}", std::process::id());
    let spec = EnvironmentSpec {
        id: id.clone(),
        dir: tmp.path().join("env"),
        function: Function {
            name: format!("fn-{test}"),
            code,
            runtime: "provided".into(),
            handler: "probe".into(),
            memory_mb,
            timeout: Duration::from_secs(3),
            isolation: Isolation::Sandbox,
            max_concurrency: 1,
            env: BTreeMap::new(),
            snapstart: false,
            network: kindling_runtime_api::environment::Network::Outbound,
            layers: Vec::new(),
            credentials: None,
        },
    };
    std::fs::create_dir(&spec.dir).unwrap();
    let listener = UnixListener::bind(spec.runtime_api_socket()).unwrap();
    let options = SandboxOptions {
        exec: Some(EXEC.into()),
        cgroup_parent: "kindling-test".into(),
        pids_limit,
        init_config: json!({
            "bootstrap": "/var/task/probe.py",
            "bootstrap_args": [probe.alloc_mb.to_string(), probe.spawn.to_string(), probe.then],
        })
        .as_object()
        .cloned()
        .unwrap(),
        ..SandboxOptions::default()
    };
    Some(Harness {
        _tmp: tmp,
        spec,
        listener,
        launcher: SandboxLauncher::new(options),
    })
}

impl Harness {
    async fn start(&self) -> SandboxEnvironment {
        self.launcher.start_sandbox(&self.spec).await.unwrap()
    }

    /// The probe's report, read from its connection to the host socket.
    async fn report(&self, env: &SandboxEnvironment) -> Value {
        let accept = tokio::time::timeout(Duration::from_secs(20), self.listener.accept());
        let Ok(Ok((stream, _))) = accept.await else {
            panic!("the probe never connected; console: {}", self.console(env));
        };
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await.unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    fn console(&self, env: &SandboxEnvironment) -> String {
        std::fs::read_to_string(env.console_log().unwrap()).unwrap_or_default()
    }
}

/// What a stopped sandbox must have left: nothing.
struct Leftovers {
    dir: PathBuf,
    cgroup: Vec<PathBuf>,
    init: Pid,
}

impl Leftovers {
    fn of(env: &SandboxEnvironment, spec: &EnvironmentSpec) -> Self {
        Self {
            dir: spec.dir.clone(),
            cgroup: env.cgroup().dirs().to_vec(),
            init: env.init_pid(),
        }
    }

    fn assert_none(&self) {
        assert!(!self.dir.exists(), "{} was left", self.dir.display());
        for dir in &self.cgroup {
            assert!(!dir.exists(), "cgroup {} was left", dir.display());
        }
        assert_eq!(kill(self.init, None), Err(Errno::ESRCH), "init still runs");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let dir = self.dir.to_string_lossy();
        assert!(
            !mounts.contains(dir.as_ref()),
            "mounts were left:\n{mounts}"
        );
    }
}

/// The probe's mount attacks, run from the host by util-linux's `nsenter` as root of the
/// sandbox's user namespace (uid and gid 0 there, every capability) in its mount and PID
/// namespaces.
fn attacks_as_namespace_root(env: &SandboxEnvironment) -> Value {
    let out = std::process::Command::new("nsenter")
        .args(["--target", &env.init_pid().to_string()])
        .args(["--user", "--mount", "--pid"])
        .args(["/usr/bin/python3", "/var/task/probe.py", "attacks"])
        .output()
        .expect("nsenter (util-linux)");
    assert!(
        out.status.success(),
        "nsenter: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the attacks' JSON")
}

#[tokio::test]
async fn the_guest_sees_a_sandbox_and_a_graceful_stop_cleans_up() {
    let Some(h) = harness("inside", 128, 1024, JUST_WAIT) else {
        return;
    };
    let mut env = h.start().await;
    let facts = h.report(&env).await;
    let console = h.console(&env);

    assert_eq!(
        facts["ppid"], 1,
        "bootstrap is init's child: {facts}\n{console}"
    );
    let pid1 = facts["pid1"].as_array().unwrap();
    assert!(pid1.contains(&json!("/run/kindling/init")), "{facts}");
    assert_eq!(facts["hostname"], "fn-inside");
    assert_eq!(facts["interfaces"], json!(["lo"]));
    assert_eq!(facts["tmp_before"], json!([]), "/tmp is fresh");
    assert_eq!(facts["tmp_write"], "ok");
    for path in ["task_write", "runtime_write", "root_write", "usr_write"] {
        assert_eq!(facts[path], "EROFS", "{path}: {facts}");
    }
    assert_eq!(facts["runtime"], json!(["kindling-bootstrap"]));
    assert_eq!(
        facts["dev"],
        json!([
            "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout",
            "tty", "urandom", "zero"
        ])
    );
    assert_eq!(facts["dev_null_write"], "ok");
    // The bootstrap is the namespace's root, bounded by init to the agent's capabilities
    // (no CAP_SYS_ADMIN) and under init's seccomp filter: no user namespace of its own,
    // where it would have every capability.
    let caps = |hex: &Value| u64::from_str_radix(hex.as_str().unwrap(), 16).unwrap();
    assert_eq!(caps(&facts["cap_eff"]), 0x1e0, "{facts}");
    assert_eq!(facts["seccomp"], "2", "{facts}");
    assert_eq!(facts["new_user_ns"], "EPERM", "{facts}");
    let init_status = std::fs::read_to_string(format!("/proc/{}/status", env.init_pid())).unwrap();
    assert!(
        init_status.lines().any(|l| l == "Seccomp:\t2"),
        "init runs under the filter:\n{init_status}"
    );
    // More than anything inside keeps: root of the sandbox's user namespace with every
    // capability, in its mount namespace. The read-only mounts stay read-only and no
    // cgroup v1 hierarchy mounts: the mounts are locked.
    let nested = attacks_as_namespace_root(&env);
    assert_ne!(
        caps(&nested["cap_eff"]) & (1 << 21),
        0,
        "CAP_SYS_ADMIN: {nested}"
    );
    for attack in [
        "remount_task_rw",
        "remount_usr_rw",
        "remount_root_rw",
        "mount_cgroup_v1",
        "remount_proc_sys_rw",
    ] {
        assert_eq!(nested[attack], "EPERM", "{attack}: {nested}");
    }
    for attack in ["unmount_proc_sys", "unmount_task"] {
        assert_eq!(nested[attack], "EINVAL", "{attack}: {nested}");
    }
    assert_eq!(facts["host"], "unix:///run/kindling/host.sock");
    assert!(env.is_alive());

    // Init is root only inside its user namespace: on the host it is an id of the
    // sandbox's own range, nothing like host root.
    let init = env.init_pid();
    let status = std::fs::read_to_string(format!("/proc/{init}/status")).unwrap();
    let host_uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(host_uid >= 0x1000_0000, "init's host uid: {host_uid}");
    let uid_map = std::fs::read_to_string(format!("/proc/{init}/uid_map")).unwrap();
    assert_eq!(
        uid_map.split_whitespace().collect::<Vec<_>>(),
        ["0", host_uid.to_string().as_str(), "65536"]
    );

    let gone = Leftovers::of(&env, &h.spec);
    let grace = Duration::from_secs(5);
    let started = Instant::now();
    env.stop(StopMode::Graceful(grace)).await.unwrap();
    // Init passed SIGTERM on and shut down by itself, well before the grace ran out.
    assert!(started.elapsed() < grace, "took {:?}", started.elapsed());
    gone.assert_none();
}

#[tokio::test]
async fn memory_and_process_limits_hold() {
    let probe = Probe {
        alloc_mb: 256,
        spawn: 64,
        then: "wait",
    };
    let Some(h) = harness("limits", 64, 16, probe) else {
        return;
    };
    let mut env = h.start().await;
    let read = |file: &str| {
        let path = env
            .cgroup()
            .dirs()
            .iter()
            .map(|d| d.join(file))
            .find(|p| p.exists());
        std::fs::read_to_string(path.unwrap_or_else(|| panic!("no {file}"))).unwrap()
    };
    let memory = ["memory.max", "memory.limit_in_bytes"]
        .iter()
        .find(|f| env.cgroup().dirs()[0].join(f).exists())
        .unwrap();
    assert_eq!(read(memory).trim(), (64u64 << 20).to_string());
    assert_eq!(read("pids.max").trim(), "16");

    let facts = h.report(&env).await;
    assert_eq!(facts["alloc_status"], -9, "the hog was OOM-killed: {facts}");
    assert_eq!(facts["spawn_error"], "EAGAIN", "{facts}");
    let spawned = facts["spawned"].as_u64().unwrap();
    assert!((1..16).contains(&spawned), "{facts}");
    let gone = Leftovers::of(&env, &h.spec);
    env.stop(StopMode::Kill).await.unwrap();
    gone.assert_none();
}

#[tokio::test]
async fn kill_stops_at_once_and_cleans_up() {
    let Some(h) = harness("kill", 128, 1024, JUST_WAIT) else {
        return;
    };
    let mut env = h.start().await;
    h.report(&env).await;
    let gone = Leftovers::of(&env, &h.spec);
    let started = Instant::now();
    env.stop(StopMode::Kill).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(!env.is_alive());
    gone.assert_none();
}

#[tokio::test]
async fn exited_tells_why_init_stopped_by_itself() {
    let Some(h) = harness(
        "exits",
        128,
        1024,
        Probe {
            then: "exit",
            ..JUST_WAIT
        },
    ) else {
        return;
    };
    let mut env = h.start().await;
    h.report(&env).await;
    let reason = tokio::time::timeout(Duration::from_secs(10), env.exited())
        .await
        .expect("init never exited after its bootstrap did");
    assert!(reason.starts_with("init exited with status"), "{reason}");
    assert!(!reason.contains('\n'));
    assert!(!env.is_alive());
    let gone = Leftovers::of(&env, &h.spec);
    env.stop(StopMode::Graceful(Duration::from_secs(1)))
        .await
        .unwrap();
    gone.assert_none();
}

#[tokio::test]
async fn a_failed_start_is_a_clear_error_and_leaves_nothing() {
    let Some(h) = harness("badinit", 128, 1024, JUST_WAIT) else {
        return;
    };
    // Bad input from the caller is refused before anything is created.
    let mut missing_code = h.spec.clone();
    missing_code.function.code = h._tmp.path().join("nowhere");
    let err = h.launcher.start_sandbox(&missing_code).await.unwrap_err();
    assert!(err.to_string().contains("is not a directory"), "{err}");
    // An init that cannot be executed fails inside the helper, after the mounts.
    let bins = h._tmp.path().join("bins");
    std::fs::create_dir(&bins).unwrap();
    for name in ["init", "kindling-bootstrap"] {
        std::fs::write(bins.join(name), "not a program").unwrap();
    }
    let launcher = SandboxLauncher::new(SandboxOptions {
        exec: Some(EXEC.into()),
        guest_bin_dir: Some(bins),
        cgroup_parent: "kindling-test".into(),
        ..SandboxOptions::default()
    });
    let err = launcher.start_sandbox(&h.spec).await.unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("executing /run/kindling/init"), "{err}");
    assert!(!h.spec.dir.exists(), "the environment's dir was left");
    for hierarchy in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/pids",
    ] {
        let cgroup = Path::new(hierarchy).join("kindling-test").join(&h.spec.id);
        assert!(!cgroup.exists(), "{} was left", cgroup.display());
    }

    // The failed start removed the socket with the environment's dir.
    let err = h.launcher.start_sandbox(&h.spec).await.unwrap_err();
    assert!(err.to_string().contains("Runtime API socket"), "{err}");
}

/// A plan in `dir` that the helper refuses before it acts on any of it: every path is
/// `dir` itself.
fn plan_to_refuse(dir: &Path, host_pid: u32) -> PathBuf {
    let plan = dir.join("plan.json");
    let dir = dir.to_string_lossy().into_owned();
    let plan_json = json!({
        "staging": dir, "root": {}, "runtime": {}, "task": dir, "host_socket": dir,
        "init": dir, "init_config": dir, "hostname": "x", "tmp_size_mb": 1, "cgroup_procs": [],
        "id_map": {"host_base": 100000, "count": 65536}, "delegate": [], "host_pid": host_pid,
    });
    std::fs::write(&plan, plan_json.to_string()).unwrap();
    plan
}

#[test]
fn without_privileges_the_helper_says_it_needs_root() {
    if !geteuid().is_root() {
        println!("SKIPPED: needs root to drop to an unprivileged user");
        return;
    }
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let plan = plan_to_refuse(tmp.path(), std::process::id());
    // The checkout may sit where the unprivileged user cannot reach (e.g. under /root).
    let exec = tmp.path().join("kindling-sandbox-exec");
    std::fs::copy(EXEC, &exec).unwrap();
    let out = std::process::Command::new(&exec)
        .arg(&plan)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.starts_with("error the sandbox helper needs root") && stdout.contains("uid 65534"),
        "{stdout}"
    );
}

/// The host spawns the helper without a fork of its own, so the helper sets its parent-death
/// signal itself; if the host is already gone by then, the signal would never come.
#[test]
fn a_helper_whose_host_is_gone_ends_at_once() {
    if !geteuid().is_root() {
        println!("SKIPPED: the helper needs root before it reads its plan's host");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // A pid above any pid_max: not this helper's parent.
    let plan = plan_to_refuse(tmp.path(), 999_999_999);
    let out = std::process::Command::new(EXEC)
        .arg(&plan)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.starts_with(
            "error dying with the host: the process 999999999 that started this one is gone"
        ),
        "{stdout}"
    );
}

#[tokio::test]
async fn an_image_directory_can_be_the_root() {
    let Some(mut h) = harness("image", 128, 1024, JUST_WAIT) else {
        return;
    };
    // A root with no libc at all: only static binaries (init, bootstrap) can run in it.
    let image = h._tmp.path().join("image");
    std::fs::create_dir_all(image.join("etc")).unwrap();
    std::fs::create_dir_all(image.join("var/cache")).unwrap();
    std::os::unix::fs::symlink("usr/bin", image.join("bin")).unwrap();
    h.launcher = SandboxLauncher::new(SandboxOptions {
        exec: Some(EXEC.into()),
        cgroup_parent: "kindling-test".into(),
        root: Some(image),
        ..SandboxOptions::default()
    });
    let mut env = h.start().await;
    // The real bootstrap asks the host for the function's environment first.
    let accept = tokio::time::timeout(Duration::from_secs(20), h.listener.accept()).await;
    let Ok(Ok((stream, _))) = accept else {
        panic!("bootstrap never connected; console: {}", h.console(&env));
    };
    let mut request = String::new();
    BufReader::new(stream)
        .read_line(&mut request)
        .await
        .unwrap();
    assert!(
        request.starts_with("GET /kindling/v1/environment "),
        "{request:?}"
    );
    let gone = Leftovers::of(&env, &h.spec);
    env.stop(StopMode::Kill).await.unwrap();
    gone.assert_none();
}

/// A server killed outright leaves its sandboxes' cgroups; the next server's launcher
/// removes them when the scheduler finds the dead server's environment folders.
#[test]
fn the_cgroup_a_dead_server_left_is_removed() {
    if !geteuid().is_root() {
        println!("SKIPPED: needs root to make cgroups");
        return;
    }
    let id = "orphan-999999999-1"; // a pid above any pid_max: its server is gone
    let limits = kindling_sandbox::cgroup::Limits {
        memory_bytes: 64 << 20,
        pids: 16,
    };
    let cgroup = kindling_sandbox::cgroup::Cgroup::create("kindling-test", id, limits).unwrap();
    let dirs = cgroup.dirs().to_vec();
    assert!(dirs.iter().all(|d| d.is_dir()));
    let launcher = SandboxLauncher::new(SandboxOptions {
        cgroup_parent: "kindling-test".into(),
        ..SandboxOptions::default()
    });
    launcher.remove_orphan(id);
    for dir in dirs {
        assert!(!dir.exists(), "{} was left", dir.display());
    }
}
