//! `kindling bench`: what the platform costs, next to what this machine's loopback costs,
//! measured in one process in one go so that every ratio compares numbers taken minutes
//! apart on the same machine, never across machines.
//!
//! Each run measures the floor (two plain loopback HTTP round trips), then, for each
//! environment kind, starts a fresh in-process server ([`kindling_runtime_api::Server`],
//! built as `kindling serve` builds it), takes its first invocation as a cold start (with
//! the `REPORT` line's breakdown), times warm invokes from one and from several kept-alive
//! clients, and reads the hypervisors' memory. The table shows the median of the runs.

mod boot;
mod cpu;
mod floor;
mod interrupt;
mod nested;
mod report;
mod rss;
mod stats;
mod table;
mod target;

use std::process::ExitCode;

use anyhow::{bail, Context as _};
use indicatif::{ProgressBar, ProgressStyle};
use kindling_images::{Cache, ImagesManifest};
use kindling_microvm::probe;
use kindling_runtime_api::config::Hypervisor;
use kindling_runtime_api::Isolation;
use procfs::process::Process;

use interrupt::Interrupt;
use table::Results;
use target::{Setup, Target, CLIENTS, PROVIDED_BOOTSTRAP};

/// The bench function's code, written into the bench's state folder at start.
const HANDLER: &str = include_str!("../examples/bench-noop/app.py");
/// Warm invokes per run by default: a sandbox invoke takes well under a millisecond, a
/// microVM invoke under emulation several; both keep a default bench near two minutes.
const DEFAULT_SANDBOX_INVOKES: usize = 500;
const DEFAULT_MICROVM_INVOKES: usize = 200;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Runs; every number is the median of the runs' numbers (0: the boot phases alone).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100))]
    runs: u32,
    /// Warm invokes per run and environment kind [default: 500 sandbox, 200 microVM].
    #[arg(long, value_parser = clap::value_parser!(u32).range(CLIENTS as i64..=1_000_000))]
    invokes: Option<u32>,
    /// Environment kinds to measure, comma-separated: sandbox, microvm.
    #[arg(
        long,
        value_delimiter = ',',
        default_values = ["sandbox", "microvm"]
    )]
    isolation: Vec<Isolation>,
    /// microVM hypervisors to measure, comma-separated: kindling, qemu
    /// [default: qemu, and kindling where this host's KVM can boot a guest kernel; both
    /// with --nested].
    #[arg(long, value_delimiter = ',')]
    hypervisor: Vec<Hypervisor>,
    /// Measure the microVM rows inside the nested-KVM harness (a QEMU TCG guest with
    /// emulated SVM, whose own KVM runs the guests): kindling-vmm and QEMU side by side on
    /// one nested KVM, for hosts whose KVM cannot boot Linux. Only ratios mean anything.
    #[arg(long, conflicts_with = "images")]
    nested: bool,
    /// Boot the images this manifest names (`kindling images build --manifest FILE`)
    /// instead of the image cache's.
    #[arg(long, value_name = "FILE", env = "KINDLING_IMAGES")]
    images: Option<std::path::PathBuf>,
    /// Before the rest, boot the guest straight from kindling-vmm and from QEMU this many
    /// times each, turn by turn, and print the boot's phases side by side (VMM set-up,
    /// first KVM_RUN, the guest's kernel → userspace → bootstrap, RSS) [default: 3 with
    /// --nested, else none].
    #[arg(long, value_name = "N")]
    boot_phases: Option<u32>,
    /// A static kindling-vmm of another build (an older commit) that boots beside this
    /// one's in the boot phases, for before/after figures taken in one run.
    #[arg(long, value_name = "PATH")]
    baseline_vmm: Option<std::path::PathBuf>,
    /// Kernel arguments to try: this kindling-vmm boots once more per turn in the boot
    /// phases, with them added to the guest's command line.
    #[arg(long, value_name = "ARGS")]
    variant_args: Option<String>,
    /// A kernel to try (an uncompressed vmlinux, say): this kindling-vmm boots it once more
    /// per turn in the boot phases, instead of the images' kernel.
    #[arg(long, value_name = "PATH")]
    variant_kernel: Option<std::path::PathBuf>,
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.nested {
        return tokio::task::spawn_blocking(move || nested::run(&args)).await?;
    }
    let interrupt = Interrupt::listen()?;
    let targets = targets(&args)?;
    let images = args
        .images
        .as_deref()
        .map(ImagesManifest::load)
        .transpose()?;
    preflight(&targets, images.is_some())?;
    let state = tempfile::Builder::new()
        .prefix("kindling-bench.")
        .tempdir_in("/tmp")
        .context("cannot create the bench's state folder in /tmp")?;
    let setup = Setup {
        code: state.path().join("code"),
        provided_code: state.path().join("provided"),
        images,
    };
    let boot_phases = args.boot_phases.unwrap_or(0) as usize;
    if boot_phases > 0 {
        let images = match &setup.images {
            Some(images) => images.clone(),
            None => nested::images(state.path())?,
        };
        let vmm = kindling_images::locate::guest_bin_dir()
            .map_err(anyhow::Error::msg)?
            .join("kindling-vmm");
        let kindling = |name: &str,
                        program: &std::path::Path,
                        args: &str,
                        kernel: Option<&std::path::Path>| {
            boot::Booter::Kindling {
                name: name.into(),
                program: program.to_path_buf(),
                args: args.into(),
                kernel: kernel.map(std::path::Path::to_path_buf),
            }
        };
        let mut booters = vec![kindling("kindling-vmm", &vmm, "", None)];
        if let Some(args) = &args.variant_args {
            booters.push(kindling(
                &format!("kindling-vmm + {args}"),
                &vmm,
                args,
                None,
            ));
        }
        if let Some(kernel) = &args.variant_kernel {
            let name = kernel.file_name().unwrap_or_default().to_string_lossy();
            let name = format!("kindling-vmm, {name}");
            booters.push(kindling(&name, &vmm, "", Some(kernel)));
        }
        if let Some(baseline) = &args.baseline_vmm {
            booters.push(kindling("baseline kindling-vmm", baseline, "", None));
        }
        booters.push(boot::Booter::Qemu);
        let dir = state.path().join("boots");
        eprintln!("kindling bench: boot phases, {boot_phases} boot(s) per hypervisor");
        let boots = tokio::task::spawn_blocking(move || {
            boot::measure(&booters, &images, boot_phases, &dir)
        })
        .await??;
        print!("{}", boot::render(&boots));
    }
    if args.runs == 0 {
        if boot_phases == 0 {
            bail!(
                "nothing to measure: --runs 0 measures the boot phases alone, give --boot-phases N"
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir(&setup.code)?;
    std::fs::write(setup.code.join("app.py"), HANDLER)?;
    if targets.contains(&Target::SANDBOX_PROVIDED) {
        std::fs::create_dir(&setup.provided_code)?;
        let program = provided_bootstrap()?;
        std::fs::copy(&program, setup.provided_code.join(PROVIDED_BOOTSTRAP))
            .with_context(|| format!("copying {}", program.display()))?;
    }
    for target in &targets {
        target::check(*target, &setup, state.path())?;
    }

    let invokes = |target: &Target| match (args.invokes, target.isolation) {
        (Some(n), _) => n as usize,
        (None, Isolation::Sandbox) => DEFAULT_SANDBOX_INVOKES,
        (None, Isolation::MicroVm) => DEFAULT_MICROVM_INVOKES,
    };
    let floor_pairs = targets
        .iter()
        .map(invokes)
        .max()
        .unwrap_or(DEFAULT_SANDBOX_INVOKES);
    let runs = args.runs as usize;
    // Per run: the floor's pairs; per target one cold start, the sequential invokes,
    // the invocations that start the concurrent environments, the concurrent invokes.
    let steps_per_run = floor_pairs
        + targets
            .iter()
            .map(|t| 1 + 2 * invokes(t) + CLIENTS + if t.snapstart().is_ok() { 2 } else { 0 })
            .sum::<usize>();
    let progress = ProgressBar::new((steps_per_run * runs) as u64).with_style(
        ProgressStyle::with_template("{prefix} {wide_msg} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    // Inside the nested harness stderr is a serial port, which passes for a terminal: the
    // bar would end up in the output that comes back.
    if target::nested() {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }

    let mut results = Results::new(&targets, runs);
    for run in 1..=runs {
        progress.set_prefix(format!("run {run}/{runs}"));
        progress.set_message("floor: loopback HTTP round trips");
        let floor = tokio::select! {
            floor = floor::measure(floor_pairs, &progress) => floor?,
            () = interrupt.clone().wait() => bail!("interrupted"),
        };
        results.floor.push(floor.pairs);
        results.floor_cpu.push(floor.cpu_per_pair);
        for (target, runs) in &mut results.targets {
            let run_dir = state.path().join(format!("r{run}"));
            runs.push(
                target::run(
                    *target,
                    &setup,
                    &run_dir,
                    invokes(target),
                    &progress,
                    interrupt.clone(),
                )
                .await
                .with_context(|| format!("{}, run {run}", target.label()))?,
            );
        }
    }
    progress.finish_and_clear();
    print!("{}", table::render(&results));
    state
        .close()
        .context("cannot remove the bench's state folder")?;
    Ok(ExitCode::SUCCESS)
}

/// The `provided` no-op's static program, built beside the guest binaries.
fn provided_bootstrap() -> anyhow::Result<std::path::PathBuf> {
    let dir = kindling_images::locate::guest_bin_dir().map_err(anyhow::Error::msg)?;
    let program = dir.join(PROVIDED_BOOTSTRAP);
    if !program.is_file() {
        bail!(
            "the bench's provided no-op (the static lambda_runtime program of tests/lambda-rs-runtime) \
             is not built in {}: run scripts/build-guest.sh (or bench with --isolation microvm)",
            dir.display()
        );
    }
    Ok(program)
}

/// What to measure, from `--isolation` and `--hypervisor`.
fn targets(args: &BenchArgs) -> anyhow::Result<Vec<Target>> {
    let hypervisors = if args.hypervisor.is_empty() {
        let mut default = vec![Hypervisor::Qemu];
        if probe::kvm().can_boot_linux {
            default.insert(0, Hypervisor::Kindling);
        }
        default
    } else {
        args.hypervisor.clone()
    };
    let mut targets = Vec::new();
    for isolation in &args.isolation {
        let asked = match isolation {
            Isolation::Sandbox => vec![Target::SANDBOX, Target::SANDBOX_PROVIDED],
            Isolation::MicroVm => hypervisors.iter().map(|h| Target::microvm(*h)).collect(),
        };
        for target in asked {
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
    }
    if targets.is_empty() {
        bail!("nothing to measure: give --isolation sandbox and/or microvm");
    }
    Ok(targets)
}

/// Clear errors, before anything is started, for what the bench needs: root for the
/// sandbox, the static guest binaries, and for microVMs the guest images (building a
/// kernel would take minutes and is `kindling images build`'s job, not the bench's), unless
/// a manifest names them.
fn preflight(targets: &[Target], manifest: bool) -> anyhow::Result<()> {
    if targets.contains(&Target::SANDBOX) && Process::myself()?.status()?.euid != 0 {
        bail!("the sandbox needs root (namespaces, mounts, cgroups): run `kindling bench` as root, or with --isolation microvm");
    }
    kindling_images::locate::guest_bin_dir().map_err(anyhow::Error::msg)?;
    if targets.contains(&Target::SANDBOX_PROVIDED) {
        provided_bootstrap()?;
    }
    if !manifest && targets.iter().any(|t| t.isolation == Isolation::MicroVm) {
        let cache = Cache::open()?;
        let built = cache.list()?;
        let has = |kind: &str, prefix: &str| {
            built
                .iter()
                .any(|e| e.kind == kind && e.name.starts_with(prefix))
        };
        if !(has("kernel", "minimal-") && has("initramfs", "minimal-") && has("rootfs", "python-"))
        {
            bail!(
                "the microVM images are not built in {}: run `kindling images build --runtime python` first \
                 (or bench with --isolation sandbox)",
                cache.root().display()
            );
        }
    }
    Ok(())
}
