//! The real `init` as PID 1 of fresh namespaces, with shell scripts as the bootstrap.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;

use nix::sys::signal::{kill, Signal};
use serde_json::json;
use support::{write_script, Guest};

#[test]
fn boots_a_ready_machine_for_the_bootstrap() {
    let Some(mut guest) = Guest::new() else {
        return;
    };
    guest
        .set("tmp_size", json!("16m"))
        .set("hostname", json!("fn-test"))
        .set("nofile", json!("512:4096"))
        .set(
            "env",
            json!({"PATH": "/usr/bin:/bin:/usr/sbin", "FOO": "bar baz"}),
        )
        .set("bootstrap_args", json!(["first arg", "second"]));
    guest.bootstrap(
        r#"echo "args=$1|$2"
findmnt -rn -o TARGET,FSTYPE | sed 's/^/mount=/'
echo "tmp_options=$(findmnt -rn -o OPTIONS /tmp)"
echo "hostname=$(cat /proc/sys/kernel/hostname)"
echo "lo_flags=$(cat /sys/class/net/lo/flags)"
echo "lo_addr=$(ip -4 -o addr show lo | grep -o 'inet [0-9./]*' | cut -d' ' -f2)"
echo "nofile=$(ulimit -Sn):$(ulimit -Hn)"
echo "stdin=$(readlink /proc/self/fd/0)"
echo "session=$(cut -d' ' -f6 /proc/$$/stat)"
echo "pid=$$"
echo "links=$(readlink /dev/fd) $(readlink /dev/stdin) $(readlink /dev/stdout) $(readlink /dev/stderr)"
echo "ptmx=$(test -c /dev/pts/ptmx && test -e /dev/ptmx && echo ok)"
echo "cgroup=$(grep '^0::' /proc/self/cgroup)"
env | sort | sed 's/^/env:/'"#,
    );
    let out = guest.run();
    assert_eq!(out.code, Some(0));
    assert_eq!(out.value("args"), "first arg|second");
    for mount in [
        "/proc proc",
        "/sys sysfs",
        "/dev devtmpfs",
        "/dev/pts devpts",
        "/dev/shm tmpfs",
        "/run tmpfs",
        "/tmp tmpfs",
        "/sys/fs/cgroup cgroup2",
    ] {
        assert!(
            out.stdout.contains(&format!("mount={mount}\n")),
            "{mount} is not mounted"
        );
    }
    assert!(out.value("tmp_options").contains("size=16384k"));
    assert_eq!(out.value("hostname"), "fn-test");
    let flags = u32::from_str_radix(out.value("lo_flags").trim_start_matches("0x"), 16).unwrap();
    assert_eq!(
        flags & libc::IFF_UP as u32,
        libc::IFF_UP as u32,
        "lo is not up"
    );
    assert_eq!(out.value("lo_addr"), "127.0.0.1/8");
    assert_eq!(out.value("nofile"), "512:4096");
    assert_eq!(out.value("stdin"), "/dev/null");
    assert_eq!(
        out.value("session"),
        out.value("pid"),
        "bootstrap is not a session leader"
    );
    assert_eq!(
        out.value("links"),
        "/proc/self/fd /proc/self/fd/0 /proc/self/fd/1 /proc/self/fd/2"
    );
    assert_eq!(out.value("ptmx"), "ok");
    if guest.has_cgroup() {
        assert_eq!(out.value("cgroup"), "0::/workload");
        let cgroup = guest.cgroup_dir().unwrap();
        assert!(
            !cgroup.join("workload").exists(),
            "init left its workload cgroup behind"
        );
    }
    let env: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("env:"))
        .collect();
    // dash adds PWD itself; init adds whom the runtime runs as (the `user`/`group` keys);
    // nothing of the host's environment may leak through.
    assert_eq!(
        env,
        [
            "FOO=bar baz",
            "KINDLING_RUNTIME_USER=993:993",
            "PATH=/usr/bin:/bin:/usr/sbin",
            "PWD=/"
        ]
    );
    assert!(
        out.stderr.starts_with("init: userspace at "),
        "{}",
        out.stderr
    );
    assert_milestone(&out.stderr, "init: userspace at ");
    assert_milestone(&out.stderr, "init: bootstrap started at ");
    assert!(out
        .stderr
        .contains("init: bootstrap exited with status 0\n"));
}

/// `<prefix>S.SSS s`: the form the hypervisor backends parse.
fn assert_milestone(stderr: &str, prefix: &str) {
    let line = stderr.lines().find_map(|l| l.strip_prefix(prefix)).unwrap();
    let (secs, _) = line.split_once(" s").unwrap();
    let (whole, frac) = secs.split_once('.').unwrap();
    assert!(whole.parse::<u64>().is_ok() && frac.len() == 3 && frac.parse::<u32>().is_ok());
}

#[test]
fn keeps_what_the_sandbox_premounted() {
    let Some(mut guest) = Guest::new() else {
        return;
    };
    guest.premount_dev();
    guest.bootstrap(
        r#"echo "dev=$(findmnt -rn -o FSTYPE /dev)"
echo "marker=$(cat /dev/marker)"
echo "pts=$(findmnt -rn -o FSTYPE /dev/pts)""#,
    );
    let out = guest.run();
    assert_eq!(out.code, Some(0));
    assert_eq!(out.value("dev"), "tmpfs");
    assert_eq!(out.value("marker"), "premounted");
    assert_eq!(out.value("pts"), "devpts");
}

#[test]
fn reaps_orphaned_grandchildren() {
    let Some(guest) = Guest::new() else { return };
    guest.bootstrap(
        r#"sh -c 'sleep 0.3 & echo $! > /tmp/orphan'
orphan=$(cat /tmp/orphan)
echo "orphan_parent=$(cut -d' ' -f4 /proc/$orphan/stat)"
sleep 1
if [ -e /proc/$orphan ]; then echo "orphan=$(cut -d' ' -f3 /proc/$orphan/stat)"; else echo orphan=gone; fi
echo "zombies=$(cut -d' ' -f3 /proc/[0-9]*/stat 2>/dev/null | grep -c Z)""#,
    );
    let out = guest.run();
    assert_eq!(out.code, Some(0));
    assert_eq!(
        out.value("orphan_parent"),
        "1",
        "the orphan was not re-parented to init"
    );
    assert_eq!(out.value("orphan"), "gone");
    assert_eq!(out.value("zombies"), "0");
}

#[test]
fn forwards_signals_and_exits_with_the_bootstraps_status() {
    let Some(guest) = Guest::new() else { return };
    guest.bootstrap(
        r#"trap 'echo got-usr1' USR1
trap 'echo got-term; exit 42' TERM
touch /out/ready
while :; do sleep 0.05; done"#,
    );
    let running = guest.spawn();
    running.wait_for_file("ready");
    let init = running.init_pid();
    kill(init, Signal::SIGUSR1).unwrap();
    running.wait_for_stdout("got-usr1");
    kill(init, Signal::SIGTERM).unwrap();
    let out = running.wait();
    assert_eq!(out.code, Some(42));
    assert!(out.stdout.contains("got-term"));
}

#[test]
fn a_crashing_bootstrap_gives_128_plus_the_signal() {
    let Some(guest) = Guest::new() else { return };
    guest.bootstrap("ulimit -c 0\nkill -SEGV $$");
    let out = guest.run();
    assert_eq!(out.code, Some(128 + libc::SIGSEGV));
    assert!(out
        .stderr
        .contains("init: bootstrap exited with status 139"));
}

/// A bootstrap that counts its starts in `/out/count` and runs `then` with `$n` set.
fn counting_bootstrap(guest: &Guest, then: &str) {
    guest.bootstrap(&format!(
        "n=$(( $(cat /out/count 2>/dev/null || echo 0) + 1 ))\necho $n > /out/count\n{then}"
    ));
}

fn starts(guest: &Guest) -> String {
    fs::read_to_string(guest.out().join("count"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn restart_never_runs_the_bootstrap_once() {
    let Some(guest) = Guest::new() else { return };
    counting_bootstrap(&guest, "exit 5");
    let out = guest.run();
    assert_eq!(out.code, Some(5));
    assert_eq!(starts(&guest), "1");
}

#[test]
fn restart_on_failure_until_the_bootstrap_succeeds() {
    let Some(mut guest) = Guest::new() else {
        return;
    };
    guest.set("restart", json!("on-failure"));
    counting_bootstrap(&guest, "[ $n -ge 3 ] && exit 0\nexit 5");
    let out = guest.run();
    assert_eq!(out.code, Some(0));
    assert_eq!(starts(&guest), "3");
    assert_eq!(out.stderr.matches("init: restarting bootstrap").count(), 2);
}

#[test]
fn restart_always_until_init_is_told_to_stop() {
    let Some(mut guest) = Guest::new() else {
        return;
    };
    guest.set("restart", json!("always"));
    counting_bootstrap(
        &guest,
        "[ $n -lt 3 ] && exit 0\ntrap 'exit 7' TERM\nkill -TERM 1\nwhile :; do sleep 0.05; done",
    );
    let out = guest.run();
    assert_eq!(out.code, Some(7));
    assert_eq!(starts(&guest), "3");
}

#[test]
fn shutdown_kills_what_ignores_sigterm() {
    let Some(mut guest) = Guest::new() else {
        return;
    };
    guest.set("grace_ms", json!(200));
    guest.bootstrap("sh -c 'trap \"\" TERM; touch /out/stubborn; sleep 30' &\nsleep 0.2");
    let out = guest.run();
    assert_eq!(out.code, Some(0));
    assert!(guest.out().join("stubborn").exists());
    assert!(out
        .stderr
        .contains("init: processes left after 200 ms, sending SIGKILL"));
}

#[test]
fn a_missing_bootstrap_is_a_clear_error() {
    let Some(mut guest) = Guest::new() else {
        return;
    };
    guest.set("bootstrap", json!("/nonexistent/bootstrap"));
    let out = guest.run();
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains(
        "init: error: start bootstrap /nonexistent/bootstrap: No such file or directory"
    ));
}

#[test]
fn an_unknown_config_key_is_a_clear_error() {
    let Some(mut guest) = Guest::new() else {
        return;
    };
    guest.set("hostnme", json!("typo"));
    guest.bootstrap("touch /out/started");
    let out = guest.run();
    assert_eq!(out.code, Some(1));
    assert!(out
        .stderr
        .contains("init: error: /etc/kindling/init.json: unknown field `hostnme`"));
    assert!(!guest.out().join("started").exists());
}

#[test]
fn a_missing_module_is_a_clear_error() {
    let Some(mut guest) = Guest::new() else {
        return;
    };
    guest.set("modules", json!(["kindling_no_such_module"]));
    guest.bootstrap("touch /out/started");
    let out = guest.run();
    assert_eq!(out.code, Some(1));
    assert!(out
        .stderr
        .contains("init: error: module kindling_no_such_module"));
    assert!(!guest.out().join("started").exists());
}

#[test]
fn unavailable_cgroup_limits_are_a_clear_error_or_applied() {
    let Some(mut guest) = Guest::new() else {
        return;
    };
    let Some(cgroup) = guest.cgroup_dir().map(Path::to_path_buf) else {
        println!("SKIPPED (host cannot): no cgroup2 on this host");
        return;
    };
    guest.set("pids_limit", json!(64));
    guest.bootstrap(r#"echo "pids_max=$(cat /sys/fs/cgroup/workload/pids.max)""#);
    let out = guest.run();
    let controllers = fs::read_to_string(cgroup.join("cgroup.controllers")).unwrap();
    if controllers.split_whitespace().any(|c| c == "pids") {
        assert_eq!(out.code, Some(0));
        assert_eq!(out.value("pids_max"), "64");
    } else {
        assert_eq!(out.code, Some(1));
        assert!(
            out.stderr
                .contains("init: error: cgroup controller pids is not available"),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn reboot_outside_the_sandbox_ends_the_pid_namespace() {
    // In a PID namespace, reboot(2) by its init ends init with SIGHUP (restart) or
    // SIGINT (power off): the real reboot path, observed from the parent.
    for (mode, signal) in [("reboot", libc::SIGHUP), ("poweroff", libc::SIGINT)] {
        let Some(mut guest) = Guest::new() else {
            return;
        };
        guest
            .set("sandbox", json!(false))
            .set("shutdown", json!(mode));
        guest.bootstrap("exit 0");
        let out = guest.run();
        assert_eq!(out.signal, Some(signal), "{mode}");
        assert!(out.stderr.contains(&format!("init: {mode} (status 0)")));
    }
}

#[test]
fn root_outside_an_initramfs_is_refused() {
    let Some(mut guest) = Guest::new() else {
        return;
    };
    guest.set("root", json!("/dev/vda"));
    let out = guest.run();
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("/ is not an initramfs"));
}

#[test]
fn a_root_device_that_never_appears_times_out() {
    let Some(mut guest) = Guest::new() else {
        return;
    };
    guest.initramfs();
    guest
        .set("root", json!("/dev/kindling-no-such-disk"))
        .set("root_wait_ms", json!(100));
    let out = guest.run();
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains(
        "init: error: root: device /dev/kindling-no-such-disk did not appear within 100 ms"
    ));
}

/// A loop device over an ext4 image, detached on drop.
struct LoopDisk(String);

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// An ext4 image of `dir` attached to a loop device, or why not.
fn loop_disk(dir: &Path, image: &Path) -> Result<LoopDisk, String> {
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(dir)
        .arg(image)
        .arg("16M")
        .output()
        .map_err(|e| format!("mkfs.ext4: {e}"))?;
    if !mkfs.status.success() {
        return Err(format!(
            "mkfs.ext4: {}",
            String::from_utf8_lossy(&mkfs.stderr)
        ));
    }
    let losetup = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(image)
        .output()
        .map_err(|e| format!("losetup: {e}"))?;
    if !losetup.status.success() {
        return Err(format!(
            "losetup: {}",
            String::from_utf8_lossy(&losetup.stderr)
        ));
    }
    Ok(LoopDisk(
        String::from_utf8_lossy(&losetup.stdout).trim().to_string(),
    ))
}

/// Copies the host's `/bin/sh` and the libraries `ldd` names into `dir`.
fn copy_shell(dir: &Path) {
    let ldd = Command::new("ldd").arg("/bin/sh").output().unwrap();
    let libs = String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(String::from)
        })
        .collect::<Vec<_>>();
    for file in libs.iter().map(String::as_str).chain(["/bin/sh"]) {
        let dst = dir.join(file.trim_start_matches('/'));
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        fs::copy(file, &dst).unwrap();
    }
}

#[test]
fn switch_root_moves_into_a_prepared_root() {
    let Some(mut guest) = Guest::new() else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let disk = scratch.path().join("disk");
    for sub in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "etc/kindling",
        "var/task",
    ] {
        fs::create_dir_all(disk.join(sub)).unwrap();
    }
    copy_shell(&disk);
    fs::write(disk.join("marker"), "on-disk\n").unwrap();
    // The root disk's own init.json is read after switch_root and layered on top.
    let root_config = json!({
        "env": {"FROM_ROOT": "yes"},
        "mounts": [{"source": "/dev/kindling-absent", "target": "/absent",
                    "fstype": "ext4", "optional": true}],
    });
    fs::write(disk.join("etc/kindling/init.json"), root_config.to_string()).unwrap();
    write_script(
        &disk.join("bootstrap.sh"),
        r#"read m < /marker; echo "marker=$m"
read t < /var/task/handler; echo "task=$t"
echo "from_root=$FROM_ROOT"
while read -r line; do case "$line" in *" / / "*) echo "root=$line";; esac; done < /proc/self/mountinfo
for f in /*; do echo "entry=$f"; done
[ -r /proc/self/stat ] && [ -d /dev/pts/ ] && echo pseudo=moved"#,
    );
    let task = scratch.path().join("task");
    fs::create_dir(&task).unwrap();
    fs::write(task.join("handler"), "code\n").unwrap();
    let disks = loop_disk(&disk, &scratch.path().join("disk.img"))
        .and_then(|d| Ok((d, loop_disk(&task, &scratch.path().join("task.img"))?)));
    let (disk, task) = match disks {
        Ok(disks) => disks,
        Err(why) => {
            println!("SKIPPED: cannot make an ext4 loop disk: {why}");
            return;
        }
    };
    guest.initramfs();
    guest
        .set("root", json!(disk.0))
        .set("root_options", json!("ro,noatime"))
        .set("task", json!(task.0))
        .set("root_wait_ms", json!(2000));
    let out = guest.run();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.value("marker"), "on-disk");
    assert_eq!(out.value("task"), "code");
    assert_eq!(out.value("from_root"), "yes");
    let root = out.value("root");
    assert!(root.contains(" / / ro,noatime"), "{root}");
    assert!(root.contains(&format!(" - ext4 {} ro", disk.0)), "{root}");
    assert_eq!(out.value("pseudo"), "moved");
    assert!(
        !out.stdout.contains("entry=/init\n"),
        "still in the initramfs"
    );
    assert!(
        !out.stdout.contains("entry=/absent\n"),
        "optional mount made"
    );
    let switched = format!("init: switched root to {} at ", disk.0);
    assert!(out.stderr.contains(&switched));
}

#[test]
fn the_guest_build_is_static() {
    let binary = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/x86_64-unknown-linux-gnu/release/init");
    if !binary.exists() {
        println!(
            "SKIPPED: {} not built (scripts/build-guest.sh)",
            binary.display()
        );
        return;
    }
    let ldd = Command::new("ldd").arg(&binary).output().unwrap();
    let text = String::from_utf8_lossy(&ldd.stdout) + String::from_utf8_lossy(&ldd.stderr);
    assert!(
        text.contains("not a dynamic executable") || text.contains("statically linked"),
        "{}: {text}",
        binary.display()
    );
}

#[test]
fn the_console_carries_init_and_bootstrap_output() {
    let Some(mut guest) = Guest::new() else {
        return;
    };
    fs::write(guest.out().join("console"), "").unwrap();
    guest.set("console", json!("/out/console"));
    guest.bootstrap("echo to-stdout\necho to-stderr >&2");
    let out = guest.run();
    assert_eq!(out.code, Some(0));
    let console = fs::read_to_string(guest.out().join("console")).unwrap();
    for line in ["to-stdout", "to-stderr", "init: bootstrap started at "] {
        assert!(
            console.contains(line),
            "{line:?} not on the console:\n{console}"
        );
    }
    assert!(!out.stdout.contains("to-stdout"));
}
