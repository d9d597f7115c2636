//! Runs the real `init` binary as PID 1 of new PID, mount, UTS, network, IPC and cgroup
//! namespaces (`unshare`), chrooted into a scratch root that borrows the host's `/usr`
//! read-only, so that small shell scripts can serve as the bootstrap.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

/// No run of init in these tests should take longer than this.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

/// Host folders the scratch root shares: bind-mounted when real folders, copied as
/// links when they are links (a merged-/usr system).
const HOST_DIRS: [&str; 7] = ["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Sets the namespaces up, then becomes init: `$1` is the prepared root, `$2` is
/// `initramfs` to run it from a fresh tmpfs copy, `$3` is `dev` to pre-mount a minimal
/// tmpfs `/dev` the way the sandbox launcher does; `$BINDS` lists host folders to bind.
const WRAPPER: &str = r#"
set -eu
root=$1
if [ "$2" = initramfs ]; then
    mount -t tmpfs -o size=64m initramfs "$root.ram"
    cp -a "$root/." "$root.ram/"
    root=$root.ram
fi
for d in $BINDS; do
    mount --bind "/$d" "$root/$d"
    mount -o remount,bind,ro "$root/$d"
done
if [ "$3" = dev ]; then
    mount -t tmpfs -o mode=0755 sandbox-dev "$root/dev"
    echo premounted > "$root/dev/marker"
    touch "$root/dev/null"
    mount --bind /dev/null "$root/dev/null"
fi
exec chroot "$root" /init --config /etc/kindling/init.json
"#;

/// Moves the shell into the test's own cgroup, then starts the namespaces.
const OUTER: &str = r#"
if [ -n "$CG" ]; then echo $$ > "$CG/cgroup.procs"; fi
exec unshare --pid --fork --kill-child --mount --uts --net --ipc $CGROUP_NS \
    --propagation private -- /bin/sh -c "$WRAPPER" wrapper "$@"
"#;

pub struct Guest {
    dir: TempDir,
    config: serde_json::Map<String, Value>,
    initramfs: bool,
    premounted_dev: bool,
    cgroup: Option<PathBuf>,
}

pub struct Finished {
    /// Exit code of init, or `None` when a signal ended it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Guest {
    /// A fresh scratch root; `None` (after saying why) where namespaces cannot be made.
    pub fn new() -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: namespaces, mounts and chroot need root");
            return None;
        }
        if Command::new("unshare").arg("--version").output().is_err() {
            println!("SKIPPED: unshare (util-linux) is not installed");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("kindling-init-test")
            .tempdir()
            .unwrap();
        let root = dir.path().join("root");
        for sub in ["dev", "etc/kindling", "out"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        fs::create_dir(dir.path().join("root.ram")).unwrap();
        for name in HOST_DIRS {
            let host = Path::new("/").join(name);
            if let Ok(target) = fs::read_link(&host) {
                symlink(target, root.join(name)).unwrap();
            } else if host.is_dir() {
                fs::create_dir(root.join(name)).unwrap();
            }
        }
        fs::copy(env!("CARGO_BIN_EXE_init"), root.join("init")).unwrap();
        let cgroup = test_cgroup();
        let config = json!({
            "sandbox": true,
            "console": "",
            "grace_ms": 500,
            "hostname": "kindling-test",
            "bootstrap": "/bootstrap.sh",
            "env": {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            "cgroup": if cgroup.is_some() { "workload" } else { "" },
        });
        let Value::Object(config) = config else {
            unreachable!()
        };
        Some(Self {
            dir,
            config,
            initramfs: false,
            premounted_dev: false,
            cgroup,
        })
    }

    /// The scratch root as the host sees it (before any initramfs copy).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Folder the bootstrap can write results into: `/out` inside.
    pub fn out(&self) -> PathBuf {
        self.root().join("out")
    }

    pub fn has_cgroup(&self) -> bool {
        self.cgroup.is_some()
    }

    /// The test's cgroup, which is the root of the guest's cgroup namespace.
    pub fn cgroup_dir(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    pub fn set(&mut self, key: &str, value: Value) -> &mut Self {
        self.config.insert(key.to_string(), value);
        self
    }

    /// Runs the root from a tmpfs copy, like an initramfs.
    pub fn initramfs(&mut self) -> &mut Self {
        self.initramfs = true;
        self
    }

    /// Pre-mounts a minimal tmpfs `/dev` (with `/dev/marker`), like the sandbox does.
    pub fn premount_dev(&mut self) -> &mut Self {
        self.premounted_dev = true;
        self
    }

    /// Writes `/bootstrap.sh`: a `/bin/sh` script.
    pub fn bootstrap(&self, script: &str) -> &Self {
        write_script(&self.root().join("bootstrap.sh"), script);
        self
    }

    pub fn spawn(&self) -> Running<'_> {
        let config = serde_json::to_string_pretty(&self.config).unwrap();
        fs::write(self.root().join("etc/kindling/init.json"), config).unwrap();
        let binds: Vec<&str> = HOST_DIRS
            .into_iter()
            .filter(|d| self.root().join(d).is_dir() && !self.root().join(d).is_symlink())
            .collect();
        let log = |name| fs::File::create(self.dir.path().join(name)).unwrap();
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(OUTER)
            .arg("outer")
            .arg(self.root())
            .arg(if self.initramfs { "initramfs" } else { "-" })
            .arg(if self.premounted_dev { "dev" } else { "-" })
            .env("WRAPPER", WRAPPER)
            .env("BINDS", binds.join(" "))
            .env(
                "CG",
                self.cgroup
                    .as_deref()
                    .map(Path::as_os_str)
                    .unwrap_or_default(),
            )
            .env(
                "CGROUP_NS",
                if self.cgroup.is_some() {
                    "--cgroup"
                } else {
                    ""
                },
            )
            .stdin(Stdio::null())
            .stdout(log("stdout"))
            .stderr(log("stderr"))
            .spawn()
            .unwrap();
        Running { guest: self, child }
    }

    /// Runs init to the end.
    pub fn run(&self) -> Finished {
        self.spawn().wait()
    }

    fn read_log(&self, name: &str) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.path().join(name)) {
            f.read_to_string(&mut text).unwrap();
        }
        text
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(cgroup) = &self.cgroup {
            let _ = fs::remove_dir(cgroup.join("init"));
            let _ = fs::remove_dir(cgroup.join("workload"));
            let _ = fs::remove_dir(cgroup);
        }
    }
}

pub struct Running<'a> {
    guest: &'a Guest,
    child: Child,
}

impl Running<'_> {
    /// The host pid of init (the child of `unshare`), once it exists.
    pub fn init_pid(&self) -> nix::unistd::Pid {
        let children = format!("/proc/{0}/task/{0}/children", self.child.id());
        let deadline = Instant::now() + RUN_TIMEOUT;
        loop {
            let text = fs::read_to_string(&children).unwrap_or_default();
            if let Some(pid) = text.split_whitespace().next() {
                return nix::unistd::Pid::from_raw(pid.parse().unwrap());
            }
            assert!(Instant::now() < deadline, "init never started");
            sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the bootstrap has created `/out/<name>`.
    pub fn wait_for_file(&self, name: &str) {
        let path = self.guest.out().join(name);
        let deadline = Instant::now() + RUN_TIMEOUT;
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "/out/{name} never appeared; stderr:\n{}",
                self.guest.read_log("stderr")
            );
            sleep(Duration::from_millis(10));
        }
    }

    /// Waits until stdout contains `text`.
    pub fn wait_for_stdout(&self, text: &str) {
        let deadline = Instant::now() + RUN_TIMEOUT;
        while !self.guest.read_log("stdout").contains(text) {
            assert!(Instant::now() < deadline, "stdout never showed {text:?}");
            sleep(Duration::from_millis(10));
        }
    }

    pub fn wait(mut self) -> Finished {
        let deadline = Instant::now() + RUN_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                // --kill-child takes init and its namespace down with unshare.
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "init did not finish within {RUN_TIMEOUT:?}; stderr:\n{}",
                    self.guest.read_log("stderr")
                );
            }
            sleep(Duration::from_millis(10));
        };
        let finished = Finished {
            code: status.code(),
            signal: status.signal(),
            stdout: self.guest.read_log("stdout"),
            stderr: self.guest.read_log("stderr"),
        };
        println!(
            "--- stdout\n{}--- stderr\n{}",
            finished.stdout, finished.stderr
        );
        finished
    }
}

impl Finished {
    /// The value of the first `key=value` line the bootstrap printed.
    pub fn value(&self, key: &str) -> &str {
        let prefix = format!("{key}=");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("bootstrap printed no {key}=; stdout:\n{}", self.stdout))
    }
}

pub fn write_script(path: &Path, body: &str) {
    fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A fresh cgroup for one test under the host's cgroup2 mount (the root of the guest's
/// cgroup namespace), so that parallel tests do not share a workload cgroup and a test
/// can check that init removed its own.
fn test_cgroup() -> Option<PathBuf> {
    let table = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = table.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split(' ').next()? == "cgroup2")
            .then(|| left.split(' ').nth(4).map(PathBuf::from))?
    });
    let Some(mount) = mount else {
        println!("note: no cgroup2 mount on this host, the workload cgroup is not tested");
        return None;
    };
    let dir = tempfile::Builder::new()
        .prefix("kindling-init-test")
        .tempdir_in(&mount)
        .ok()?
        .keep();
    Some(dir)
}
