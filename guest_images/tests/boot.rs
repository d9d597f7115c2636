//! Boots what this crate builds, under QEMU TCG (`-M microvm`, no KVM needed): the minimal
//! kernel and initramfs switch_root into the `provided-debian` root image on `/dev/vda`,
//! init mounts the code image from `/dev/vdb` at `/var/task`, and `ls` run as the
//! bootstrap shows the function's files with their modes.

mod common;

use std::path::Path;
use std::process::Command;

use common::shared_cache;
use kindling_images::{build_code_image, build_initramfs, build_kernel, build_root_image};
use kindling_images::{KernelKind, Runtime};

/// Why this machine cannot run the boot test, if it cannot.
fn missing_tool() -> Option<&'static str> {
    let have = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("qemu-system-x86_64", "--version") {
        Some("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    } else if !Path::new("/usr/src/linux-source-6.1.tar.xz").is_file() {
        Some("linux-source-6.1 is not installed")
    } else if !have("debootstrap", "--version") {
        Some("debootstrap is not installed")
    } else {
        None
    }
}

#[test]
fn guest_boots_into_the_root_image_with_code_at_var_task() {
    if let Some(why) = missing_tool() {
        println!("SKIPPED: {why}");
        return;
    }
    let cache = shared_cache();
    let kernel = build_kernel(&cache, KernelKind::Minimal).unwrap_or_else(|e| panic!("{e:#}"));
    let initramfs = build_initramfs(&cache, &kernel).unwrap();
    let root =
        build_root_image(&cache, Runtime::ProvidedDebian).unwrap_or_else(|e| panic!("{e:#}"));
    let code_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello-bash");
    let code = build_code_image(
        &cache,
        &code_dir,
        Runtime::ProvidedDebian,
        "function.handler",
    )
    .unwrap();

    let drive = |id: &str, path: &Path| {
        [
            "-drive".to_string(),
            format!(
                "id={id},file={},format=raw,if=none,readonly=on",
                path.display()
            ),
            "-device".to_string(),
            format!("virtio-blk-device,drive={id}"),
        ]
    };
    let out = Command::new("timeout")
        .arg("60")
        .arg("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=off",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
        ])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&kernel.bzimage)
        .arg("-initrd")
        .arg(&initramfs.path)
        .args(drive("root", &root.ext4))
        .args(drive("task", &code.ext4))
        .arg("-append")
        .arg(
            "console=ttyS0 reboot=t panic=-1 random.trust_cpu=on quiet \
             kindling.bootstrap=/bin/ls \"kindling.bootstrap_args=-l /var/task\"",
        )
        .output()
        .expect("qemu runs");
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the guest did not shut down by itself: {:?}\n{console}",
        out.status
    );
    assert!(console.contains("switched root to /dev/vda"), "{console}");
    let listed = |mode: &str, name: &str| {
        console
            .lines()
            .any(|l| l.starts_with(mode) && l.ends_with(name))
    };
    assert!(
        listed("-rwxr-xr-x", " bootstrap"),
        "/var/task/bootstrap, executable:\n{console}"
    );
    assert!(
        listed("-rw-r--r--", " function.sh"),
        "/var/task/function.sh:\n{console}"
    );
}
