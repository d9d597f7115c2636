//! kindling-jailer for real: it jails the static kindling-vmm (serving its API, no VM yet)
//! and the test reads, from `/proc` of the jailed process, what the jail promises: the
//! uid/gid, no capability in any set, `no_new_privs`, PID 1 of its own PID namespace, mount
//! and network namespaces of its own (only `lo`), a root holding only the program, `/dev/kvm`
//! and the bind-mounted files, and the cgroup. The host still reaches the VMM's socket
//! through the read-write bind. Bad input gets a clear error and leaves nothing behind.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const JAILER: &str = env!("CARGO_BIN_EXE_kindling-jailer");
/// An id nothing else on the host uses.
const UID: u32 = 64_917;
const GID: u32 = 64_918;

/// The static kindling-vmm that scripts/build-guest.sh builds; `None` (with the SKIPPED
/// line the test script counts) when it was not built.
fn static_vmm() -> Option<PathBuf> {
    let found = kindling_images::locate::guest_bin_dir()
        .map(|dir| dir.join("kindling-vmm"))
        .and_then(|vmm| {
            vmm.is_file()
                .then_some(vmm)
                .ok_or_else(|| "no static kindling-vmm".to_string())
        });
    match found {
        Ok(vmm) => Some(vmm),
        Err(e) => {
            println!("SKIPPED: {e}: run scripts/build-guest.sh");
            None
        }
    }
}

/// The jailer, killed (with what it jails) if the test fails.
struct Jailer(Child);

impl Drop for Jailer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "no {what} within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status_field(pid: u32, key: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in the status of {pid}"))
        .trim()
        .to_string()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The static kindling-vmm serving its API in a jail: a read-only config file and a
/// read-write socket folder bound in.
struct Jailed {
    /// First, so that it is killed before its folder goes.
    jailer: Jailer,
    tmp: tempfile::TempDir,
    config: PathBuf,
    sockets: PathBuf,
    api: PathBuf,
    id: String,
    /// The jailed VMM, the jailer's child.
    pid: u32,
}

impl Jailed {
    fn start(vmm: &Path, extra: &[&str]) -> Jailed {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("config.json");
        fs::write(&config, "{}").unwrap();
        let sockets = tmp.path().join("sockets");
        fs::create_dir(&sockets).unwrap();
        std::os::unix::fs::chown(&sockets, Some(UID), Some(GID)).unwrap();
        let api = sockets.join("api.sock");
        let id = format!("jailtest-{}-{}", std::process::id(), extra.len());
        let jailer = Jailer(
            Command::new(JAILER)
                .args(["--id", &id])
                .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
                .arg("--exec-file")
                .arg(vmm)
                .arg("--chroot-base-dir")
                .arg(tmp.path().join("jails"))
                .arg("--bind")
                .arg(&config)
                .arg("--bind-rw")
                .arg(&sockets)
                .args(extra)
                .arg("--")
                .arg("--api-sock")
                .arg(&api)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_until("API socket", || api.exists());
        let jailer_pid = jailer.0.id();
        let children =
            fs::read_to_string(format!("/proc/{jailer_pid}/task/{jailer_pid}/children")).unwrap();
        Jailed {
            pid: children.trim().parse().unwrap(),
            jailer,
            tmp,
            config,
            sockets,
            api,
            id,
        }
    }
}

#[test]
fn the_jailed_vmm_runs_unprivileged_alone_in_its_chroot_and_namespaces() {
    let Some(vmm) = static_vmm() else { return };
    let Jailed {
        mut jailer,
        tmp,
        config,
        sockets,
        api,
        id,
        pid,
    } = Jailed::start(&vmm, &["--cgroup", "cgroup.max.descendants=0"]);
    let base = tmp.path().join("jails");
    let jailer_pid = jailer.0.id();

    // The socket the VMM made is its user's, and the host reaches it at the same path.
    assert_eq!(fs::metadata(&api).unwrap().uid(), UID);
    let mut conn = UnixStream::connect(&api).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut reply = [0; 64];
    let n = conn.read(&mut reply).unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    let ids = |id: u32| format!("{id}\t{id}\t{id}\t{id}");
    assert_eq!(status_field(pid, "Uid"), ids(UID));
    assert_eq!(status_field(pid, "Gid"), ids(GID));
    assert_eq!(status_field(pid, "Groups"), GID.to_string());
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "NSpid"), format!("{pid}\t1"));
    for ns in ["mnt", "net", "pid", "ipc"] {
        let theirs = fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "the jailed VMM shares our {ns} namespace");
    }
    let net = fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
    let links: Vec<&str> = net
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(links, ["lo"]);

    // Its root: the program, its /dev with only kvm, and the path down to the binds.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let top = tmp.path().iter().nth(1).unwrap().to_string_lossy();
    assert_eq!(entries(&root), ["dev", "kindling-vmm", top.as_ref()]);
    assert_eq!(entries(&root.join("dev")), ["kvm"]);
    let kvm = fs::metadata(root.join("dev/kvm")).unwrap();
    assert_eq!((kvm.uid(), kvm.gid()), (UID, GID));
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    assert_eq!(entries(&inside(tmp.path())), ["config.json", "sockets"]);
    assert_eq!(fs::read_to_string(inside(&config)).unwrap(), "{}");
    let mountinfo = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let options = |point: &str| {
        mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(point))
            .unwrap_or_else(|| panic!("{point} is not mounted:\n{mountinfo}"))
            .split(' ')
            .nth(5)
            .unwrap()
            .to_string()
    };
    assert!(options("/").starts_with("ro,"), "{mountinfo}");
    assert!(options(&config.to_string_lossy()).starts_with("ro,"));
    assert!(options(&sockets.to_string_lossy()).starts_with("rw,"));

    // The cgroup: the VMM in it, the limit written.
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let line = format!("0::/kindling-vmm/{id}");
    assert!(cgroup.lines().any(|l| l == line), "{cgroup}");
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let cgroup2 = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .unwrap();
    let dir = cgroup2.join("kindling-vmm").join(&id);
    assert_eq!(
        fs::read_to_string(dir.join("cgroup.max.descendants")).unwrap(),
        "0\n"
    );

    // SIGTERM reaches the VMM through the jailer, which ends as the VMM ended (5: stopped
    // before a VM started) and removes the jail and the cgroup.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(jailer_pid).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = jailer.0.wait().unwrap();
    assert_eq!(status.code(), Some(5), "{status}");
    assert!(!base.join("kindling-vmm").join(&id).exists());
    assert!(!dir.exists());
}

/// `--netns` joins the given network namespace instead of a new one.
#[test]
fn the_jailed_vmm_joins_the_network_namespace_it_is_given() {
    let Some(vmm) = static_vmm() else { return };
    let ours = format!("/proc/{}/ns/net", std::process::id());
    let jailed = Jailed::start(&vmm, &["--netns", &ours]);
    let ns = |pid: &str, ns: &str| fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
    let pid = jailed.pid.to_string();
    assert_eq!(ns(&pid, "net"), ns("self", "net"));
    assert_ne!(ns(&pid, "mnt"), ns("self", "mnt"));
}

/// The only child of `pid`.
fn child_of(pid: u32) -> u32 {
    let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    children.trim().parse().unwrap()
}

/// Whether `pid` runs: a zombie has ended.
fn running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// `--parent-pid`: the jailer dies with the process that started it, with no hook of that
/// process's own between fork and exec, even when it is SIGKILLed; the VMM with the jailer.
#[test]
fn the_jail_dies_with_its_parent() {
    let Some(vmm) = static_vmm() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let sockets = tmp.path().join("sockets");
    fs::create_dir(&sockets).unwrap();
    std::os::unix::fs::chown(&sockets, Some(UID), Some(GID)).unwrap();
    let api = sockets.join("api.sock");
    // A shell stands in for the server: it starts the jailer with its own pid and waits.
    let shell = Command::new("/bin/sh")
        .args([
            "-c",
            r#"jailer="$1"; shift; "$jailer" --parent-pid $$ "$@" & wait"#,
        ])
        .args(["sh", JAILER])
        .args(["--id", &format!("jailtest-parent-{}", std::process::id())])
        .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .arg("--exec-file")
        .arg(&vmm)
        .arg("--chroot-base-dir")
        .arg(tmp.path().join("jails"))
        .arg("--bind-rw")
        .arg(&sockets)
        .arg("--")
        .arg("--api-sock")
        .arg(&api)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut shell = Jailer(shell);
    wait_until("API socket", || api.exists());
    let jailer = child_of(shell.0.id());
    let vmm = child_of(jailer);
    shell.0.kill().unwrap();
    shell.0.wait().unwrap();
    wait_until("the jailer's and the VMM's end", || {
        !running(jailer) && !running(vmm)
    });
}

fn jail(args: &[&str]) -> Output {
    Command::new(JAILER)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn fails_with(args: &[&str], message: &str) {
    let out = jail(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(message),
        "{args:?}: expected {message:?}, got {}: {stderr}",
        out.status
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().to_string_lossy().into_owned();
    let with = |id: &str, exec: &str, uid: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "--id",
            id,
            "--exec-file",
            exec,
            "--uid",
            uid,
            "--gid",
            "64918",
        ]
        .map(String::from)
        .to_vec();
        if !extra.contains(&"--chroot-base-dir") {
            args.extend(["--chroot-base-dir".into(), base.clone()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let cases: [(Vec<String>, &str); 10] = [
        (
            with("vm1", "/nonexistent/kindling-vmm", "64917", &[]),
            "no such file",
        ),
        (
            with("vm1", "kindling-vmm", "64917", &[]),
            "--exec-file kindling-vmm: an absolute path",
        ),
        (with("../x", "/bin/true", "64917", &[]), "--id \"../x\""),
        (with("a/b", "/bin/true", "64917", &[]), "--id \"a/b\""),
        (with("vm1", "/bin/true", "0", &[]), "must not be 0"),
        (
            with("vm1", "/bin/true", "64917", &["--bind", "relative/file"]),
            "--bind relative/file: an absolute path",
        ),
        (
            with(
                "vm1",
                "/bin/true",
                "64917",
                &["--bind", "/etc/../etc/hostname"],
            ),
            "without `..`",
        ),
        (
            with("vm1", "/bin/true", "64917", &["--cgroup", "memory.max"]),
            "FILE=VALUE",
        ),
        (
            with("vm1", "/bin/true", "64917", &["--chroot-base-dir", "jails"]),
            "--chroot-base-dir jails: an absolute path",
        ),
        (
            with("vm1", "/bin/true", "64917", &["--parent-pid", "999999999"]),
            "--parent-pid: the process 999999999 that started this one is gone",
        ),
    ];
    for (args, message) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&args, message);
    }
    assert!(
        entries(tmp.path()).is_empty(),
        "a refused jail left {:?}",
        entries(tmp.path())
    );
}

/// A dynamic program finds no libraries in the chroot: the jail is built all the way, the
/// exec fails with a message that says why, and the jail is removed again.
#[test]
fn a_dynamic_program_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let out = jail(&[
        "--id",
        "dynamic",
        "--exec-file",
        "/bin/true",
        "--uid",
        "64917",
        "--gid",
        "64918",
        "--chroot-base-dir",
        &tmp.path().to_string_lossy(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && stderr.contains("build it static"),
        "{}: {stderr}",
        out.status
    );
    assert!(entries(&tmp.path().join("true")).is_empty());
}

/// A dynamic program that lies in a bound folder runs from there, with its libraries bound
/// beside it (as QEMU and its vsock daemon are jailed): here `ls` shows the jail from
/// inside: only the bound folders and `/dev`, which `--no-kvm` leaves empty, and no
/// `/proc`.
#[test]
fn a_dynamic_program_runs_in_place_with_its_libraries_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--id",
        "in-place",
        "--exec-file",
        "/usr/bin/ls",
        "--uid",
        "64917",
        "--gid",
        "64918",
        "--no-kvm",
    ];
    let base = tmp.path().to_string_lossy().into_owned();
    args.extend(["--chroot-base-dir", &base]);
    for system in ["/usr", "/lib", "/lib64"] {
        if Path::new(system).exists() {
            args.extend(["--bind", system]);
        }
    }
    args.extend(["--", "-1A", "/", "/dev", "/proc"]);
    let out = jail(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // `ls` exits 2 for the missing /proc, after listing the rest.
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("/proc") && stderr.contains("No such file"),
        "{stderr}"
    );
    let listing: Vec<&str> = stdout.lines().collect();
    let root: Vec<&str> = listing
        .iter()
        .skip_while(|l| **l != "/:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .copied()
        .collect();
    let mut expected = vec!["dev", "usr"];
    expected.extend(
        ["lib", "lib64"]
            .into_iter()
            .filter(|d| Path::new("/").join(d).exists()),
    );
    expected.sort_unstable();
    assert_eq!(root, expected, "{stdout}");
    let dev: Vec<&str> = listing
        .iter()
        .skip_while(|l| **l != "/dev:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .copied()
        .collect();
    assert!(dev.is_empty(), "/dev holds {dev:?}");
    // Nothing was linked in, and the jail is gone again.
    assert!(entries(&tmp.path().join("ls")).is_empty());
}

/// Whatever it runs, the jailed program is under the seccomp denylist: calls an
/// unprivileged user may make elsewhere — a session keyring, a vsock socket, a user
/// namespace — fail with EPERM (here python3 in place, with its libraries bound, tries them).
#[test]
fn the_jailed_program_runs_under_the_seccomp_denylist() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().to_string_lossy().into_owned();
    let probe = "import ctypes\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        def errno(rc): return 0 if rc != -1 else ctypes.get_errno()\n\
        print('keyctl', errno(libc.syscall(250, 0, -3, 0)))\n\
        print('vsock', errno(libc.socket(40, 1, 0)))\n\
        print('userns', errno(libc.unshare(0x10000000)))\n";
    let mut args = vec![
        "--id",
        "filtered",
        "--exec-file",
        "/usr/bin/python3",
        "--uid",
        "64917",
        "--gid",
        "64918",
        "--no-kvm",
        "--chroot-base-dir",
        &base,
    ];
    for system in ["/usr", "/lib", "/lib64"] {
        if Path::new(system).exists() {
            args.extend(["--bind", system]);
        }
    }
    args.extend(["--", "-c", probe]);
    let out = jail(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // EPERM (1) from the filter; without it: a keyring id, a socket, a namespace (or
    // EAFNOSUPPORT where the host has no vsock).
    assert_eq!(stdout, "keyctl 1\nvsock 1\nuserns 1\n", "{stderr}");
}

/// `--cgroup-version 1` (a hybrid host's): each limit goes to the v1 hierarchy of its
/// controller, the VMM joins every one of them, and all are removed when it ends.
#[test]
fn v1_limits_go_to_the_hierarchy_of_each_controller() {
    let found = kindling_plumbing::cgroup::Hierarchies::read().unwrap();
    let (Some(memory), Some(pids)) = (found.v1("memory"), found.v1("pids")) else {
        println!(
            "SKIPPED (host cannot): no cgroup v1 memory and pids hierarchies (a v2-only host)"
        );
        return;
    };
    let Some(vmm) = static_vmm() else { return };
    let Jailed {
        mut jailer,
        pid,
        id,
        ..
    } = Jailed::start(
        &vmm,
        &[
            "--cgroup-version",
            "1",
            "--cgroup",
            "memory.limit_in_bytes=268435456",
            "--cgroup",
            "pids.max=20",
        ],
    );
    let listed = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = format!("/kindling-vmm/{id}");
    for controller in ["memory", "pids"] {
        assert!(
            listed.lines().any(|l| {
                let f: Vec<&str> = l.splitn(3, ':').collect();
                f[1].split(',').any(|c| c == controller) && f[2] == path
            }),
            "not in its {controller} cgroup:\n{listed}"
        );
    }
    let memory_dir = memory.join("kindling-vmm").join(&id);
    let pids_dir = pids.join("kindling-vmm").join(&id);
    assert_eq!(
        fs::read_to_string(memory_dir.join("memory.limit_in_bytes")).unwrap(),
        "268435456\n"
    );
    assert_eq!(
        fs::read_to_string(pids_dir.join("pids.max")).unwrap(),
        "20\n"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(jailer.0.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    jailer.0.wait().unwrap();
    assert!(!memory_dir.exists() && !pids_dir.exists());
}
