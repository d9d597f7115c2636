//! Boot phases, hypervisor by hypervisor: each boots the bench's guest (the minimal kernel,
//! its initramfs and the python root drive, 1 vCPU, [`MEMORY_MIB`] MiB, the launcher's
//! command line) straight from its own command line, with no server, jail or vsock around
//! it, until the guest's init prints `init: bootstrap started`; turn by turn, so that every
//! hypervisor sees the machine in the same state. kindling-vmm's `--timings` line gives its
//! set-up phases and the guest's milestones as they passed on its console; for QEMU the
//! guest's own figures come from the console. A baseline kindling-vmm (an older build) may
//! boot beside them, for before/after figures taken in one run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use comfy_table::{ContentArrangement, Table};
use kindling_images::ImagesManifest;
use kindling_microvm::console;
use kindling_microvm::qemu::QEMU;
use serde_json::{json, Value};

/// The guest's RAM, as the bench function's.
const MEMORY_MIB: u64 = 128;
/// How long one boot may take to start the bootstrap, under nested emulation on a busy host.
const BOOT_PATIENCE: Duration = Duration::from_secs(180);
/// The launcher's command line (`kindling serve`'s), less the task drive this boot lacks.
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet random.trust_cpu=on \
                       kindling.root=/dev/vda kindling.hostname=bench";
/// What the launcher adds for kindling-vmm: its bare i8042 and its boot-timer page.
const KINDLING_CMDLINE: &str = " i8042.dumbkbd i8042.noaux i8042.nomux kindling.boot_timer=1";

/// A hypervisor that boots the guest.
#[derive(Debug, Clone)]
pub enum Booter {
    /// kindling-vmm at `program`, under `name`, with `args` added to the guest's command
    /// line and `kernel` instead of the images' (variants to try).
    Kindling {
        name: String,
        program: PathBuf,
        args: String,
        kernel: Option<PathBuf>,
    },
    Qemu,
}

impl Booter {
    pub fn name(&self) -> &str {
        match self {
            Booter::Kindling { name, .. } => name,
            Booter::Qemu => "qemu/kvm",
        }
    }
}

/// One boot's figures.
#[derive(Debug, Clone)]
pub struct Boot {
    /// Spawning the hypervisor → `init: bootstrap started` on the console (host clock).
    pub to_bootstrap: Duration,
    /// The guest's clock: kernel start → init, and init → bootstrap started.
    pub guest_userspace: Option<f64>,
    pub guest_bootstrap: Option<f64>,
    /// The hypervisor's RSS then, less the guest's RAM.
    pub own_rss: Option<u64>,
    /// kindling-vmm's `--timings` line.
    pub timings: Option<Value>,
}

/// Boots the guest of `images` `runs` times on each of `booters`, turn by turn, in `dir`.
pub fn measure(
    booters: &[Booter],
    images: &ImagesManifest,
    runs: usize,
    dir: &Path,
) -> anyhow::Result<Vec<(String, Vec<Boot>)>> {
    let root = &images
        .runtimes
        .get("python")
        .context("the images have no python root")?
        .ext4;
    let mut results: Vec<(String, Vec<Boot>)> = booters
        .iter()
        .map(|b| (b.name().to_string(), Vec::new()))
        .collect();
    std::fs::create_dir_all(dir)?;
    // One untimed boot each first: the first boot after the programs and images were
    // copied in pays for reading them (under nested emulation, whole seconds).
    for booter in booters {
        boot_once(booter, images, root, dir)
            .with_context(|| format!("booting on {} (warm-up)", booter.name()))?;
    }
    for run in 1..=runs {
        for (booter, (_, boots)) in booters.iter().zip(&mut results) {
            let boot = boot_once(booter, images, root, dir)
                .with_context(|| format!("booting on {}", booter.name()))?;
            // Progress: a long run is also a test of many boots in a row.
            eprintln!(
                "kindling bench: boot {run}/{runs} on {}: bootstrap after {:.1} s",
                booter.name(),
                boot.to_bootstrap.as_secs_f64(),
            );
            boots.push(boot);
        }
    }
    Ok(results)
}

fn boot_once(
    booter: &Booter,
    images: &ImagesManifest,
    root: &Path,
    dir: &Path,
) -> anyhow::Result<Boot> {
    let console = dir.join("console.log");
    let stderr = dir.join("stderr.log");
    let _ = std::fs::remove_file(&console);
    let mut cmd = match booter {
        Booter::Kindling {
            program,
            args,
            kernel,
            ..
        } => {
            let config = dir.join("vm.json");
            let vm = json!({
                "boot-source": {
                    "kernel_image_path": kernel.as_ref().unwrap_or(&images.kernel),
                    "initrd_path": images.initramfs,
                    "boot_args": format!("{CMDLINE}{KINDLING_CMDLINE} {args}").trim_end(),
                },
                "drives": [{"drive_id": "root", "path_on_host": root,
                            "is_root_device": false, "is_read_only": true}],
                "machine-config": {"vcpu_count": 1, "mem_size_mib": MEMORY_MIB},
            });
            std::fs::write(&config, vm.to_string())?;
            let mut cmd = Command::new(program);
            cmd.args(["--no-api", "--timings", "--config-file"])
                .arg(&config)
                .arg("--serial-out")
                .arg(&console);
            cmd
        }
        Booter::Qemu => {
            let mut cmd = Command::new(QEMU);
            cmd.args(["-M", "microvm,acpi=off", "-accel", "kvm", "-smp", "1"])
                .args(["-m", &format!("{MEMORY_MIB}M")])
                .args([
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-no-reboot",
                ])
                .arg("-serial")
                .arg(format!("file:{}", console.display()))
                .arg("-kernel")
                .arg(&images.kernel)
                .arg("-initrd")
                .arg(&images.initramfs)
                .args(["-append", CMDLINE])
                .arg("-drive")
                .arg(format!(
                    "id=root,file={},format=raw,if=none,readonly=on",
                    root.display()
                ))
                .args(["-device", "virtio-blk-device,drive=root"])
                .args(["-device", "i8042"]);
            cmd
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr)?);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", booter.name()))?;
    let waited = wait_for_bootstrap(&mut child, &console, started);
    let own_rss = own_rss(child.id());
    // Stopped the way Kindling stops a VM: SIGTERM (kindling-vmm asks the guest to shut
    // down and prints its timings), then SIGKILL.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0)),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait()?;
    let to_bootstrap = waited.with_context(|| {
        format!(
            "console:\n{}\nstderr:\n{}",
            console::tail(&console, 20),
            std::fs::read_to_string(&stderr).unwrap_or_default()
        )
    })?;
    let text = String::from_utf8_lossy(&std::fs::read(&console)?).into_owned();
    let timings = std::fs::read_to_string(&stderr)?
        .lines()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| v["kindling_vmm_timings"].clone())
        .filter(|v| !v.is_null());
    Ok(Boot {
        to_bootstrap,
        guest_userspace: console::userspace_at(&text),
        guest_bootstrap: console::bootstrap_started_at(&text),
        own_rss,
        timings,
    })
}

/// Spawn → `init: bootstrap started` on `console`.
fn wait_for_bootstrap(
    child: &mut Child,
    console: &Path,
    started: Instant,
) -> anyhow::Result<Duration> {
    loop {
        let text = std::fs::read(console).unwrap_or_default();
        if String::from_utf8_lossy(&text).contains("init: bootstrap started") {
            return Ok(started.elapsed());
        }
        if let Some(status) = child.try_wait()? {
            bail!("exited ({status}) before the guest started its bootstrap");
        }
        if started.elapsed() > BOOT_PATIENCE {
            bail!("the guest did not start its bootstrap within {BOOT_PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `pid`'s resident memory less the guest's RAM (its mappings of exactly that size).
fn own_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some((rss_kib << 10).saturating_sub(super::rss::rss_of_size(&smaps, MEMORY_MIB << 20)))
}

/// The boot-phase table: medians per hypervisor, and each one's ratio to the first.
pub fn render(results: &[(String, Vec<Boot>)]) -> String {
    let median =
        |values: Vec<f64>| super::stats::median(values.into_iter().filter(|v| v.is_finite()));
    let of = |boots: &[Boot], f: &dyn Fn(&Boot) -> Option<f64>| {
        median(boots.iter().filter_map(f).collect())
    };
    let us = |key: &'static str| {
        move |b: &Boot| {
            let t = b.timings.as_ref()?;
            t.get(key)
                .or_else(|| t["setup_phases"].get(key))?
                .as_f64()
                .map(|us| us / 1e6)
        }
    };
    let figures = [
        figure("hypervisor start → bootstrap started", true, |b| {
            Some(b.to_bootstrap.as_secs_f64())
        }),
        figure(
            "  VMM set-up (process start → instance start)",
            false,
            us("process_start_to_instance_start_us"),
        ),
        figure("    guest memory", false, us("guest_memory_us")),
        figure(
            "    KVM VM, irqchip, legacy devices",
            false,
            us("kvm_vm_and_legacy_devices_us"),
        ),
        figure("    virtio devices", false, us("virtio_devices_us")),
        figure("    kernel load", false, us("kernel_load_us")),
        figure("    vCPUs", false, us("vcpus_us")),
        figure(
            "  instance start → first KVM_RUN",
            false,
            us("instance_start_to_first_kvm_run_us"),
        ),
        // The host's first KVM_RUN → userspace less the guest's own clock, which starts once
        // the kernel proper runs: its decompression and earliest set-up.
        figure("  first KVM_RUN → guest clock starts", false, |b| {
            let at = |key: &str| b.timings.as_ref()?.get(key)?.as_f64();
            let (run, userspace) = (
                at("instance_start_to_first_kvm_run_us")?,
                at("instance_start_to_userspace_us")?,
            );
            Some((userspace - run) / 1e6 - b.guest_userspace?)
        }),
        figure("  guest: kernel → userspace", true, |b| b.guest_userspace),
        figure("  guest: userspace → bootstrap started", true, |b| {
            Some(b.guest_bootstrap? - b.guest_userspace?)
        }),
    ];
    let mut table = Table::new();
    table
        .load_preset("     --             ")
        .set_content_arrangement(ContentArrangement::Disabled);
    let mut header = vec!["boot phase (median)".to_string()];
    for (name, _) in results {
        header.push(name.clone());
    }
    for (name, _) in results.iter().skip(1) {
        header.push(format!("{} ÷ {name}", results[0].0));
    }
    table.set_header(header);
    let mut add =
        |label: &str, values: Vec<Option<f64>>, compare: bool, show: &dyn Fn(f64) -> String| {
            let mut row = vec![label.to_string()];
            row.extend(values.iter().map(|v| v.map_or("—".into(), show)));
            for other in values.iter().skip(1) {
                row.push(match (values[0], *other, compare) {
                    (Some(a), Some(b), true) if b > 0.0 => format!("{:.2}×", a / b),
                    _ => String::new(),
                });
            }
            table.add_row(row);
        };
    for (label, compare, f) in &figures {
        let values = results
            .iter()
            .map(|(_, boots)| of(boots, f.as_ref()))
            .collect();
        add(label, values, *compare, &|s| format!("{s:.3} s"));
    }
    let rss = results
        .iter()
        .map(|(_, boots)| of(boots, &|b| b.own_rss.map(|r| r as f64)))
        .collect();
    add("RSS at bootstrap, less guest RAM", rss, true, &|b| {
        format!("{:.1} MiB", b / f64::from(1 << 20))
    });
    let runs = results.first().map_or(0, |(_, b)| b.len());
    format!(
        "{}\nEach hypervisor booted the guest {runs} time(s), turn by turn, after one untimed \
         boot each; medians. No server, jail or vsock: the hypervisor alone, from its own \
         command line.\n",
        table.trim_fmt()
    )
}

/// One row of the boot-phase table: its label, whether hypervisors are compared on it, and
/// how a boot gives its figure (seconds).
type Figure = (&'static str, bool, Box<dyn Fn(&Boot) -> Option<f64>>);

fn figure(
    label: &'static str,
    compare: bool,
    f: impl Fn(&Boot) -> Option<f64> + 'static,
) -> Figure {
    (label, compare, Box::new(f))
}
