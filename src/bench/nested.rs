//! `kindling bench --nested`: the microVM rows measured inside the nested-KVM harness, for
//! hosts whose own KVM cannot boot Linux. The harness boots a level-1 guest under QEMU TCG
//! with emulated SVM; inside it, this same `kindling bench` runs kindling-vmm and QEMU side
//! by side on that guest's real KVM, booting the images of the host's cache (named by a
//! manifest, as `kindling serve --images` boots them). Every guest instruction there is
//! emulated twice over: the table's figures are only good for their ratios.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use kindling_images::{
    build_initramfs, build_kernel, build_root_image, Cache, ImagesManifest, KernelKind, RootPaths,
    Runtime,
};
use kindling_microvm::qemu::{QEMU, VHOST_VSOCK};
use kindling_nested_kvm::{shell_quote, Job};

use super::BenchArgs;

/// Boots per hypervisor of the boot phases, unless `--boot-phases` says otherwise.
const DEFAULT_BOOTS: u32 = 3;
/// The group `/dev/kvm` gets in L1 (Debian's `kvm` group id; any but root's would do).
const KVM_GID: u32 = 994;
/// How long the whole nested run may take, L1's boot included.
const NESTED_TIMEOUT: Duration = Duration::from_secs(1800);
/// QEMU's firmware for `-M microvm` and its option ROMs for `-kernel`, where Debian puts
/// them (what is missing is left out: QEMU names what it lacks).
const QEMU_FIRMWARE: [&str; 5] = [
    "/usr/share/seabios/bios-microvm.bin",
    "/usr/share/qemu/qboot.rom",
    "/usr/share/qemu/linuxboot_dma.bin",
    "/usr/share/qemu/kvmvapic.bin",
    "/usr/share/qemu/pvh.bin",
];

/// Runs the bench's microVM rows inside the harness and prints the table it printed there.
pub fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let work = tempfile::Builder::new()
        .prefix("kindling-bench-nested.")
        .tempdir_in("/tmp")
        .context("cannot create a scratch folder in /tmp")?;
    let images = images(work.path())?;
    let manifest = work.path().join("images.json");
    images.save(&manifest)?;
    let statics = kindling_images::locate::guest_bin_dir().map_err(anyhow::Error::msg)?;
    let kindling = std::env::current_exe()?;
    let qemu = on_path(QEMU)?;
    let vhost = on_path(VHOST_VSOCK)?;
    let mkfs = on_path("mkfs.ext4")?;
    // Both side by side unless `--hypervisor` names fewer.
    let hypervisors = if args.hypervisor.is_empty() {
        "kindling,qemu".to_string()
    } else {
        let names: Vec<_> = args.hypervisor.iter().map(|h| h.name()).collect();
        names.join(",")
    };
    let mut bench = format!(
        "exec {} bench --isolation microvm --hypervisor {hypervisors} --runs {} --images {} \
         --boot-phases {}",
        quote(&kindling),
        args.runs,
        quote(&manifest),
        args.boot_phases.unwrap_or(DEFAULT_BOOTS)
    );
    if let Some(invokes) = args.invokes {
        bench.push_str(&format!(" --invokes {invokes}"));
    }
    if let Some(baseline) = &args.baseline_vmm {
        bench.push_str(&format!(" --baseline-vmm {}", quote(baseline)));
    }
    if let Some(variant) = &args.variant_args {
        bench.push_str(&format!(" --variant-args {}", shell_quote(variant)));
    }
    if let Some(kernel) = &args.variant_kernel {
        bench.push_str(&format!(" --variant-kernel {}", quote(kernel)));
    }
    // The helpers' folders on L1's $PATH, where the microVM backends look for them.
    let mut path = String::from("$PATH");
    for program in [&qemu, &vhost, &mkfs] {
        if let Some(dir) = program.parent() {
            path.push(':');
            path.push_str(&quote(dir));
        }
    }
    // QEMU runs unprivileged and opens /dev/kvm through its group, as udev sets it up on
    // a distribution (L1's devtmpfs makes it root's alone).
    let script =
        format!("export PATH={path}\nchown 0:{KVM_GID} /dev/kvm\nchmod 660 /dev/kvm\n{bench}\n");
    let mut job = Job::new(script)
        .file(&kindling)
        .file(statics.join("kindling-vmm"))
        .file(statics.join("kindling-jailer"))
        .env("KINDLING_GUEST_BIN_DIR", statics.to_string_lossy())
        .file(&manifest)
        .file(&images.kernel)
        .file(&images.initramfs)
        .file(qemu)
        .file(vhost)
        .file(mkfs)
        .file("/etc/mke2fs.conf")
        .timeout(NESTED_TIMEOUT);
    for root in images.runtimes.values() {
        job = job.file(&root.ext4);
    }
    for file in [&args.baseline_vmm, &args.variant_kernel]
        .into_iter()
        .flatten()
    {
        job = job.file(file);
    }
    for firmware in QEMU_FIRMWARE.into_iter().filter(|f| Path::new(f).exists()) {
        job = job.file(firmware);
    }
    eprintln!(
        "kindling bench --nested: booting the nested-KVM host (QEMU TCG with SVM) and benching \
         kindling-vmm and QEMU inside it; this takes many minutes"
    );
    let outcome = kindling_nested_kvm::run(&job)?;
    eprintln!("{}", outcome.timing());
    print!("{}", outcome.output);
    if !outcome.success() {
        bail!(
            "the bench failed inside the nested-KVM host (status {:?}); its console:\n{}",
            outcome.status,
            outcome.console
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The minimal kernel, its initramfs and the python root image, from the image cache
/// (built there first if missing).
pub(super) fn images(work: &Path) -> anyhow::Result<ImagesManifest> {
    let cache = Cache::open()?;
    let kernel = build_kernel(&cache, KernelKind::Minimal)?;
    let initramfs = build_initramfs(&cache, &kernel)?;
    let root = build_root_image(&cache, Runtime::Python)?;
    let mut manifest = ImagesManifest {
        kernel: kernel.bzimage,
        initramfs: initramfs.path,
        runtimes: Default::default(),
    };
    // The root folder is a sandbox's: a microVM-only bench leaves it behind.
    manifest.runtimes.insert(
        Runtime::Python.name().to_string(),
        RootPaths {
            ext4: root.ext4,
            dir: work.to_path_buf(),
        },
    );
    Ok(manifest)
}

/// Where `program` is on `$PATH`.
fn on_path(program: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(program))
                .find(|path| path.is_file())
        })
        .with_context(|| format!("{program} is not on $PATH (scripts/setup.sh installs it)"))
}

fn quote(path: &Path) -> String {
    shell_quote(&path.to_string_lossy())
}
