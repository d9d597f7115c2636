//! The nested-KVM harness: a real KVM for tests on hosts whose own cannot boot Linux.
//!
//! This project's machines have a nested, shadow-paging KVM (`kvm_pvm`) that runs guest user
//! code natively but cannot boot a kernel (ENVIRONMENT.md). QEMU's TCG, though, emulates an
//! AMD CPU with SVM and nested paging: a level-1 (L1) guest booted under it — Debian's generic
//! kernel with `kvm_amd` and `tun`, and a static busybox, from
//! [`kindling_images::build_nested_host`] — has a working `/dev/kvm` of its own, on which
//! kindling-vmm boots Linux as a level-2 guest.
//!
//! A [`Job`] is a shell script and the host files it needs. Files go into L1's initramfs at
//! their host paths, each dynamic executable with its shared libraries, so a test binary (or
//! kindling-vmm, whose path a test knows from `env!`) runs there unchanged. The job's output
//! and exit status come back on a second serial port and the console. [`NestedTest`] is the entry
//! point for tests: where the host's KVM boots Linux (metal, or L1 itself) the
//! test runs as is; elsewhere it re-runs itself inside L1.
//!
//! It tests correctness, not speed: a nested-TCG time is never compared with metal.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::BufWriter;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kindling_images::{
    build_initramfs, build_kernel, build_nested_host, build_root_image, Cache, CpioArchive,
    KernelKind, NestedHost, Runtime,
};

/// Set (to `1`) in every job's environment: code that runs inside L1 can tell.
pub const INSIDE_ENV: &str = "KINDLING_NESTED_L1";
/// The emulated L1 CPU: AMD with SVM and nested paging. TCG's SVM cannot intercept XSETBV,
/// so XSAVE stays off (L2 would run without it anyway, and print a CPUID dump about it).
const L1_CPU: &str = "EPYC-v1,+svm,+npt,-xsave";
/// L1's kernel command line. `mitigations=off`: TCG does not execute speculatively, so
/// L1's defences against speculation (retpolines, return thunks on every `ret`, the
/// return stack refilled on each context switch and each exit of an L2 guest) guard
/// nothing and cost emulated instructions, most in the exits KVM handles for L2.
/// `tsc=reliable`: L1 keeps the TSC (which under TCG is the host's counter) as its clock
/// instead of having a watchdog compare it with the emulated HPET, which may fall behind
/// when this host is loaded.
const L1_CMDLINE: &str =
    "console=ttyS0 panic=-1 rdinit=/init loglevel=5 mitigations=off tsc=reliable";
/// L1's own memory besides its initramfs: its kernel and busybox, the programs a job runs and
/// a few L2 guests (their memory is touched lazily, on L1 and on this host alike).
const BASE_MEMORY_MIB: u64 = 3072;
const STATUS_MARK: &str = "nested-kvm: exit status ";
const START_MARK: &str = "nested-kvm: job starts at uptime ";
/// How long L1 may take for one delegated test (they take 7–35 s here).
const NESTED_TEST_TIMEOUT: Duration = Duration::from_secs(150);
/// Environment variables a delegated test takes along into L1 (besides `KINDLING_*`).
const PASSED_ENV: [&str; 3] = ["RUST_LOG", "RUST_BACKTRACE", "RUST_MIN_STACK"];

/// Where a test that needs a Linux guest under KVM runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinuxKvm {
    /// This host's KVM boots Linux (hardware KVM, or inside L1).
    Here,
    /// It cannot (the reason says why): the test runs inside the harness.
    Nested(String),
}

/// Decides where Linux guests run: here, or nested.
pub fn linux_kvm() -> LinuxKvm {
    if std::env::var_os(INSIDE_ENV).is_some() {
        return LinuxKvm::Here;
    }
    let verdict = kindling_microvm::probe::kvm();
    if verdict.can_boot_linux {
        LinuxKvm::Here
    } else {
        LinuxKvm::Nested(verdict.reason.clone())
    }
}

/// A shell script to run inside L1, with the files and environment it needs.
#[derive(Debug, Clone)]
pub struct Job {
    script: String,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
    timeout: Duration,
    quiet_limit: Option<Duration>,
}

impl Job {
    /// A job running `script` (busybox `sh`, working directory `/tmp`).
    pub fn new(script: impl Into<String>) -> Job {
        Job {
            script: script.into(),
            files: Vec::new(),
            env: Vec::new(),
            timeout: Duration::from_secs(300),
            quiet_limit: None,
        }
    }

    /// Packs `path` (a file, or a folder with everything in it) at the same path in L1.
    pub fn file(mut self, path: impl Into<PathBuf>) -> Job {
        self.files.push(path.into());
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Job {
        self.env.push((key.into(), value.into()));
        self
    }

    /// How long L1 may run in all, boot included (default 300 s).
    pub fn timeout(mut self, timeout: Duration) -> Job {
        self.timeout = timeout;
        self
    }

    /// How long the job may go without writing any output (default: no limit but the
    /// timeout). Under the double emulation an L1 sometimes stops making progress for
    /// good (QEMU's TCG loses its timer interrupt: halted, the vector pending in its
    /// LAPIC); a job that writes as it goes is then stopped early, and its caller can tell
    /// what it got done from [`Unfinished`].
    pub fn quiet_limit(mut self, limit: Duration) -> Job {
        self.quiet_limit = Some(limit);
        self
    }
}

/// The error of a job that L1 never reported a status for: stopped at its timeout or its
/// quiet limit. What it wrote until then is in `output`.
#[derive(Debug, Clone)]
pub struct Unfinished {
    /// Why it was stopped, and where L1's CPU was then.
    pub why: String,
    /// The job's stdout and stderr so far.
    pub output: String,
    /// L1's console.
    pub console: String,
}

impl std::fmt::Display for Unfinished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the nested-KVM host did not finish: {}\n--- console ---\n{}\n--- output ---\n{}",
            self.why, self.console, self.output
        )
    }
}

impl std::error::Error for Unfinished {}

/// What a job did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The script's exit status; `None` when L1 never reported one (crash, timeout).
    pub status: Option<i32>,
    /// The script's stdout and stderr.
    pub output: String,
    /// L1's console: its kernel's messages and the harness's marks.
    pub console: String,
    /// L1's uptime when the job started: its kernel's boot and the module loads (QEMU's
    /// start and the kernel's decompression come before).
    pub boot: Option<Duration>,
    /// QEMU start → QEMU exit.
    pub elapsed: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// One line on where the time went.
    pub fn timing(&self) -> String {
        let boot = self
            .boot
            .map_or_else(|| "?".to_string(), |b| format!("{:.1}", b.as_secs_f64()));
        format!(
            "nested-kvm: L1 boot {boot} s, whole run {:.1} s (QEMU TCG with SVM)",
            self.elapsed.as_secs_f64()
        )
    }
}

/// Boots L1, runs the job in it and powers it off.
pub fn run(job: &Job) -> Result<Outcome> {
    let host = build_nested_host(&Cache::open()?).context("cannot build the nested-KVM host")?;
    let work = WorkDir::new()?;
    let initramfs = work.0.join("l1.cpio");
    let packed_bytes = pack(&host, job, &initramfs)?;
    let memory_mib = BASE_MEMORY_MIB + 2 * packed_bytes.div_ceil(1 << 20);
    let console = work.0.join("console.log");
    let output = work.0.join("output.log");
    let monitor = work.0.join("monitor.sock");
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", L1_CPU, "-smp", "1"])
        .args(["-m", &memory_mib.to_string()])
        .args(["-display", "none", "-no-reboot", "-nodefaults"])
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", output.display()))
        .arg("-kernel")
        .arg(&host.kernel)
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", L1_CMDLINE])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let deadline = started + job.timeout;
    let mut last_output = (0, Instant::now());
    let mut stopped = None;
    let exited = loop {
        if let Some(status) = qemu.try_wait()? {
            break Some(status);
        }
        let now = Instant::now();
        let written = fs::metadata(&output).map_or(0, |m| m.len());
        if written != last_output.0 {
            last_output = (written, now);
        }
        let quiet = now.duration_since(last_output.1);
        let why = if now > deadline {
            Some(format!("not done within {:?}", job.timeout))
        } else if job.quiet_limit.is_some_and(|limit| quiet > limit) {
            Some(format!("no output for {quiet:.0?}"))
        } else {
            None
        };
        if let Some(why) = why {
            stopped = Some(format!(
                "{why}\n--- where L1's CPU was ---\n{}",
                where_l1_is(&monitor)
            ));
            let _ = qemu.kill();
            let _ = qemu.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = started.elapsed();
    let console = String::from_utf8_lossy(&fs::read(&console).unwrap_or_default()).into_owned();
    let output = String::from_utf8_lossy(&fs::read(&output).unwrap_or_default()).into_owned();
    let status = console
        .lines()
        .find_map(|l| l.trim().strip_prefix(STATUS_MARK))
        .and_then(|s| s.trim().parse().ok());
    let boot = console
        .lines()
        .find_map(|l| l.trim().strip_prefix(START_MARK))
        .and_then(|s| s.trim().parse::<f64>().ok())
        .map(Duration::from_secs_f64);
    if let (Some(why), None) = (stopped, status) {
        return Err(Unfinished {
            why,
            output,
            console,
        }
        .into());
    }
    if status.is_none() {
        let mut stderr = String::new();
        if let Some(mut pipe) = qemu.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        bail!("the nested-KVM host ended without the job's status ({exited:?}): {stderr}\n--- console ---\n{console}\n--- output ---\n{output}");
    }
    Ok(Outcome {
        status,
        output,
        console,
        boot,
        elapsed,
    })
}

/// What L1's CPU is doing, from QEMU's monitor: its registers (those of L2 while L1 runs one:
/// TCG holds the guest's state then), sampled twice to tell a loop from a halt.
fn where_l1_is(monitor: &Path) -> String {
    let mut report = String::new();
    let Ok(mut conn) = std::os::unix::net::UnixStream::connect(monitor) else {
        return format!("(no monitor at {})", monitor.display());
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    for command in [
        "info registers\nx/4i $pc\ninfo lapic\ninfo pic\n",
        "info registers\n",
    ] {
        let _ = std::io::Write::write_all(&mut conn, command.as_bytes());
        std::thread::sleep(Duration::from_millis(300));
        let mut buf = vec![0; 1 << 16];
        if let Ok(n) = std::io::Read::read(&mut conn, &mut buf) {
            // The monitor echoes each command with terminal escapes: those lines go.
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                if !line.contains('\x1b') {
                    report.push_str(line);
                    report.push('\n');
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    report
}

/// A test that needs a Linux guest under KVM, run where one can run: here when this host's
/// KVM boots Linux, else re-run inside L1 by the same test binary.
#[derive(Debug, Clone)]
pub struct NestedTest {
    name: String,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
}

impl NestedTest {
    /// Test `name` of the current test binary (`--exact`).
    pub fn new(name: &str) -> NestedTest {
        NestedTest {
            name: name.to_string(),
            files: Vec::new(),
            env: Vec::new(),
        }
    }

    /// A file the test reads (a kernel, an image, a binary it runs), packed at its path.
    pub fn file(mut self, path: impl Into<PathBuf>) -> NestedTest {
        self.files.push(path.into());
        self
    }

    /// A file packed at its path and named to the test by the environment variable `key`.
    pub fn file_env(mut self, key: &str, path: impl Into<PathBuf>) -> NestedTest {
        let path = path.into();
        self.env
            .push((key.to_string(), path.to_string_lossy().into_owned()));
        self.file(path)
    }

    /// Returns `false` when this host's KVM boots Linux: the caller goes on and runs the
    /// test's body here. Otherwise it runs the test inside L1 (with the `KINDLING_*`
    /// environment), prints its output and how long the harness took, panics unless it
    /// passed there, and returns `true`: the caller returns.
    pub fn run_here_or_nested(self) -> bool {
        let reason = match linux_kvm() {
            LinuxKvm::Here => return false,
            LinuxKvm::Nested(reason) => reason,
        };
        let name = &self.name;
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut job = Job::new(format!(
            "exec {} --exact {} --nocapture --test-threads=1 --color never",
            shell_quote(&exe.to_string_lossy()),
            shell_quote(name)
        ))
        .file(&exe);
        for file in self.files {
            job = job.file(file);
        }
        for (key, value) in std::env::vars() {
            if key.starts_with("KINDLING_") || PASSED_ENV.contains(&key.as_str()) {
                job = job.env(key, value);
            }
        }
        for (key, value) in self.env {
            job = job.env(key, value);
        }
        println!("nested-kvm: running {name} inside the harness: {reason}");
        job = job.timeout(NESTED_TEST_TIMEOUT);
        // A job that never reports its status (L1 hung under the double emulation) is
        // tried once more, in the open: a test that fails inside fails at once.
        let outcome = run(&job).or_else(|e| {
            println!("nested-kvm: no status from {name} ({e:#}); trying once more");
            run(&job)
        });
        let outcome = outcome.unwrap_or_else(|e| panic!("nested-KVM harness: {e:#}"));
        println!("{}", outcome.timing());
        print!("{}", indent(&outcome.output));
        assert!(
            outcome.success(),
            "{name} failed inside the nested-KVM host (status {:?})\n--- L1 console ---\n{}",
            outcome.status,
            outcome.console
        );
        assert!(
            outcome.output.contains("1 passed"),
            "{name} did not run inside the nested-KVM host:\n{}",
            outcome.output
        );
        true
    }
}

/// The Linux guest the VMM's tests boot: Kindling's minimal kernel, its initramfs and the
/// `provided` root image.
#[derive(Debug, Clone)]
pub struct LinuxGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
}

impl LinuxGuest {
    /// From `KINDLING_KERNEL`/`_INITRD`/`_ROOTFS` (set by scripts/test.sh, and inside the
    /// harness), else from the image cache (built there if missing).
    pub fn find() -> Result<LinuxGuest> {
        let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
        if let (Some(kernel), Some(initrd), Some(rootfs)) = (
            var("KINDLING_KERNEL"),
            var("KINDLING_INITRD"),
            var("KINDLING_ROOTFS"),
        ) {
            return Ok(LinuxGuest {
                kernel,
                initrd,
                rootfs,
            });
        }
        let cache = Cache::open()?;
        let kernel = build_kernel(&cache, KernelKind::Minimal)?;
        Ok(LinuxGuest {
            initrd: build_initramfs(&cache, &kernel)?.path,
            rootfs: build_root_image(&cache, Runtime::Provided)?.ext4,
            kernel: kernel.bzimage,
        })
    }

    /// Debian's stock cloud kernel with its initramfs (which loads the virtio and ext4
    /// modules) and the same root image: a guest that finds its devices only through ACPI.
    /// Inside the harness, the files [`LinuxGuest::pack`] brought.
    pub fn stock() -> Result<LinuxGuest> {
        if std::env::var_os(INSIDE_ENV).is_some() {
            return Self::find();
        }
        let cache = Cache::open()?;
        let kernel = build_kernel(&cache, KernelKind::Stock)?;
        let rootfs = match std::env::var_os("KINDLING_ROOTFS") {
            Some(path) => path.into(),
            None => build_root_image(&cache, Runtime::Provided)?.ext4,
        };
        Ok(LinuxGuest {
            initrd: build_initramfs(&cache, &kernel)?.path,
            rootfs,
            kernel: kernel.bzimage,
        })
    }

    /// `test` with the guest's files packed, named by the variables [`LinuxGuest::find`]
    /// reads inside the harness.
    pub fn pack(&self, test: NestedTest) -> NestedTest {
        test.file_env("KINDLING_KERNEL", &self.kernel)
            .file_env("KINDLING_INITRD", &self.initrd)
            .file_env("KINDLING_ROOTFS", &self.rootfs)
    }
}

/// Writes L1's initramfs (uncompressed: gunzip under TCG is slow); returns its size.
fn pack(host: &NestedHost, job: &Job, path: &Path) -> Result<u64> {
    let mut archive = CpioArchive::new(BufWriter::new(File::create(path)?));
    for dir in ["bin", "dev", "proc", "sys", "tmp", "run", "nested"] {
        archive.dir(dir)?;
    }
    archive.node("dev/console", 0o020600, (5, 1))?;
    archive.file("bin/busybox", 0o100755, &fs::read(&host.busybox)?)?;
    for module in &host.modules {
        archive.file_in_tree(module, 0o100644, &fs::read(host.dir.join(module))?)?;
    }
    let modules: String = host.modules.iter().map(|m| format!("/{m}\n")).collect();
    archive.file("nested/modules", 0o100644, modules.as_bytes())?;
    let mut env = format!("export {INSIDE_ENV}=1\n");
    for (key, value) in &job.env {
        writeln!(env, "export {key}={}", shell_quote(value))?;
    }
    archive.file("nested/env", 0o100644, env.as_bytes())?;
    archive.file("nested/job", 0o100644, job.script.as_bytes())?;
    archive.file("init", 0o100755, L1_INIT.as_bytes())?;
    let mut packed = std::collections::BTreeSet::new();
    for file in &job.files {
        for (path, mode) in with_dependencies(file)? {
            if !packed.insert(path.clone()) {
                continue;
            }
            let name = path
                .strip_prefix("/")
                .with_context(|| format!("{} is not an absolute path", path.display()))?;
            let data =
                fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            archive.file_in_tree(&name.to_string_lossy(), 0o100000 | mode, &data)?;
        }
    }
    let out = archive.finish()?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    Ok(file.metadata()?.len())
}

/// `path` (absolute, with every file under it when a folder) and, for each dynamic ELF
/// executable, the shared libraries `ldd` names; each with its permission bits.
fn with_dependencies(path: &Path) -> Result<Vec<(PathBuf, u32)>> {
    let path = std::path::absolute(path)?;
    let meta = fs::metadata(&path).with_context(|| format!("cannot pack {}", path.display()))?;
    if meta.is_dir() {
        let mut all = Vec::new();
        for entry in fs::read_dir(&path)? {
            all.extend(with_dependencies(&entry?.path())?);
        }
        return Ok(all);
    }
    let mode = meta.permissions().mode() & 0o7777;
    let mut all = vec![(path.clone(), mode)];
    if mode & 0o111 != 0 && is_elf(&path)? {
        let out = Command::new("ldd").arg(&path).output()?;
        // A static executable: ldd says so and fails; nothing to add.
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let lib = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line
                    .split_whitespace()
                    .next()
                    .filter(|w| w.starts_with('/')),
            };
            if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
                all.push((PathBuf::from(lib), 0o755));
            }
        }
    }
    Ok(all)
}

fn is_elf(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 4];
    let mut file = File::open(path)?;
    Ok(std::io::Read::read_exact(&mut file, &mut magic).is_ok() && magic == *b"\x7fELF")
}

/// `value` in single quotes for `sh`.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  | {l}\n")).collect()
}

/// A scratch folder for one run, removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<WorkDir> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kindling-nested-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// PID 1 of L1: mounts (cgroup2 too: the jailer's VM limits), loads the modules (KVM, tun), brings up loopback, runs the job with
/// its output on the second serial port, reports its status on the console and powers off.
const L1_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t cgroup2 cgroup2 /sys/fs/cgroup
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/tmp TMPDIR=/tmp
for m in $(cat /nested/modules); do insmod "$m" || echo "nested-kvm: insmod $m failed"; done
[ -c /dev/kvm ] || echo "nested-kvm: no /dev/kvm after loading the modules"
ip link set lo up
. /nested/env
cd /tmp
stty -F /dev/ttyS1 raw -echo
echo "nested-kvm: transparent huge pages: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>&1)"
echo "nested-kvm: job starts at uptime $(cut -d' ' -f1 /proc/uptime)"
sh /nested/job </dev/null >/dev/ttyS1 2>&1
echo "nested-kvm: exit status $?"
sync
poweroff -f
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn a_dynamic_executable_brings_its_libraries() {
        let files = with_dependencies(Path::new("/bin/sh")).unwrap();
        assert!(
            files
                .iter()
                .any(|(p, _)| p.to_string_lossy().contains("libc.so")),
            "{files:?}"
        );
    }
}
