//! The guest kernel's configuration and the initramfs around init (and modules).

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{shared_cache, temp_cache};
use kindling_images::{build_initramfs, build_kernel, is_static_elf, Kernel, KernelKind};

/// Every option issue 4 asks of the minimal kernel, plus DEVMEM (init's boot timer),
/// VIRTIO_MMIO_CMDLINE_DEVICES and PVH: written out here, independently of the fragment.
const REQUIRED: &[&str] = &[
    "64BIT",
    "SMP",
    "PRINTK",
    "TTY",
    "SERIAL_8250",
    "SERIAL_8250_CONSOLE",
    "BLK_DEV_INITRD",
    "RD_GZIP",
    "DEVTMPFS",
    "PROC_FS",
    "SYSFS",
    "TMPFS",
    "BINFMT_ELF",
    "BINFMT_SCRIPT",
    "MULTIUSER",
    "FUTEX",
    "EPOLL",
    "SIGNALFD",
    "TIMERFD",
    "EVENTFD",
    "SHMEM",
    "FILE_LOCKING",
    "POSIX_TIMERS",
    "UNIX98_PTYS",
    "NET",
    "UNIX",
    "INET",
    "CGROUPS",
    "MEMCG",
    "CGROUP_PIDS",
    "NAMESPACES",
    "HYPERVISOR_GUEST",
    "PARAVIRT",
    "KVM_GUEST",
    "PVH",
    "VIRTIO",
    "VIRTIO_MMIO",
    "VIRTIO_MMIO_CMDLINE_DEVICES",
    "BLOCK",
    "VIRTIO_BLK",
    "EXT4_FS",
    "VSOCKETS",
    "VIRTIO_VSOCKETS",
    "HW_RANDOM_VIRTIO",
    "VIRTIO_CONSOLE",
    "SLUB",
    "KERNEL_LZ4",
    "NO_HZ_IDLE",
    "HIGH_RES_TIMERS",
    "DEVMEM",
];
const FORBIDDEN: &[&str] = &["SLOB", "PCI", "MODULES"];

fn kernel_source_installed() -> bool {
    let ok = Path::new("/usr/src/linux-source-6.1.tar.xz").is_file();
    if !ok {
        println!("SKIPPED: linux-source-6.1 is not installed (apt-get install linux-source-6.1 bc bison flex libelf-dev libssl-dev lz4)");
    }
    ok
}

#[test]
fn minimal_kernel_has_every_required_option() {
    if !kernel_source_installed() {
        return;
    }
    let cache = shared_cache();
    let kernel = build_kernel(&cache, KernelKind::Minimal).unwrap_or_else(|e| panic!("{e:#}"));
    let config = fs::read_to_string(&kernel.config).unwrap();
    let missing: Vec<_> = REQUIRED
        .iter()
        .filter(|o| !config.lines().any(|l| l == format!("CONFIG_{o}=y")))
        .collect();
    assert!(missing.is_empty(), "the kernel lacks {missing:?}");
    let present: Vec<_> = FORBIDDEN
        .iter()
        .filter(|o| config.lines().any(|l| l == format!("CONFIG_{o}=y")))
        .collect();
    assert!(present.is_empty(), "the kernel has {present:?}");
    assert!(
        kindling_images::missing_options(&config, kindling_images::MINIMAL_FRAGMENT).is_empty()
    );

    let vmlinux = kernel
        .vmlinux
        .as_ref()
        .expect("the minimal kernel comes with vmlinux");
    assert!(
        is_static_elf(vmlinux).unwrap(),
        "vmlinux is an ELF without interpreter"
    );
    let bzimage = fs::read(&kernel.bzimage).unwrap();
    assert_eq!(
        &bzimage[0x202..0x206],
        b"HdrS",
        "bzImage carries the x86 boot protocol header"
    );
    assert!(
        bzimage.len() < 8 << 20,
        "bzImage is {} bytes; the minimal kernel should be ~3 MB",
        bzimage.len()
    );
    assert!(kernel.modules.is_empty());
    assert!(
        kernel.release.starts_with("6.1"),
        "release {}",
        kernel.release
    );

    let again = build_kernel(&cache, KernelKind::Minimal).unwrap();
    assert!(again.cached && again.elapsed < Duration::from_secs(1));
}

/// Runs `cpio ARGS` on the decompressed archive and returns its standard output.
fn cpio(archive: &Path, args: &str) -> Vec<u8> {
    let script = format!("gzip -dc '{}' | cpio --quiet {args}", archive.display());
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Lists a gzip'd cpio with `cpio -itv`: (mode string, path).
fn cpio_listing(archive: &Path) -> Vec<(String, String)> {
    String::from_utf8(cpio(archive, "-itv"))
        .unwrap()
        .lines()
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields[0].to_string(), fields.last().unwrap().to_string())
        })
        .collect()
}

fn cpio_file(archive: &Path, path: &str) -> Vec<u8> {
    cpio(archive, &format!("-i --to-stdout '{path}'"))
}

#[test]
fn initramfs_holds_init_console_config_and_modules() {
    // A stand-in for the stock kernel: a kernel entry with two modules to pack.
    let (dir, cache) = temp_cache();
    let kdir = dir.path().join("stock-0123456789abcdef");
    let modules = [
        "lib/modules/6.1.0-test/kernel/fs/jbd2/jbd2.ko",
        "lib/modules/6.1.0-test/kernel/fs/ext4/ext4.ko",
    ];
    for m in modules {
        fs::create_dir_all(kdir.join(m).parent().unwrap()).unwrap();
        fs::write(kdir.join(m), format!("module {m}")).unwrap();
    }
    let kernel = Kernel {
        kind: KernelKind::Stock,
        bzimage: kdir.join("bzImage"),
        vmlinux: None,
        config: kdir.join("config"),
        release: "6.1.0-test".to_string(),
        modules: modules.iter().map(|m| m.to_string()).collect(),
        dir: kdir,
        cached: true,
        elapsed: Duration::ZERO,
    };
    let initramfs = build_initramfs(&cache, &kernel)
        .expect("build the initramfs (run scripts/build-guest.sh first)");
    assert!(!initramfs.cached);
    let listing = cpio_listing(&initramfs.path);
    let mode = |path: &str| {
        listing
            .iter()
            .find(|(_, p)| p == path)
            .map(|(m, _)| m.as_str())
            .unwrap_or_else(|| panic!("{path} not in {listing:?}"))
    };
    assert_eq!(mode("init"), "-rwxr-xr-x");
    assert!(
        mode("dev/console").starts_with('c'),
        "/dev/console is a character device"
    );
    assert_eq!(mode("etc/kindling/init.json"), "-rw-r--r--");
    for m in modules {
        assert_eq!(mode(m), "-rw-r--r--");
        assert_eq!(
            cpio_file(&initramfs.path, m),
            format!("module {m}").into_bytes()
        );
    }
    assert!(mode("lib/modules/6.1.0-test/kernel/fs").starts_with('d'));

    let init = dir.path().join("init");
    fs::write(&init, cpio_file(&initramfs.path, "init")).unwrap();
    assert!(is_static_elf(&init).unwrap());
    let config: serde_json::Value =
        serde_json::from_slice(&cpio_file(&initramfs.path, "etc/kindling/init.json")).unwrap();
    assert_eq!(config["root"], "/dev/vda");
    assert_eq!(config["root_fstype"], "ext4");
    let listed: Vec<_> = config["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        listed,
        modules.map(|m| format!("/{m}")),
        "modules in load order, as paths inside the initramfs"
    );

    let again = build_initramfs(&cache, &kernel).unwrap();
    assert!(again.cached && again.elapsed < Duration::from_secs(1));
    assert_eq!(
        fs::read(&again.path).unwrap(),
        fs::read(&initramfs.path).unwrap()
    );
}

#[test]
fn stock_kernel_comes_with_its_modules_in_load_order() {
    let known = Command::new("apt-cache")
        .args(["show", "linux-image-cloud-amd64"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !known {
        println!("SKIPPED: apt knows no linux-image-cloud-amd64 (not a Debian machine, or apt-get update needed)");
        return;
    }
    let cache = shared_cache();
    let kernel = build_kernel(&cache, KernelKind::Stock).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(fs::read(&kernel.bzimage).unwrap()[0x202..0x206] == *b"HdrS");
    assert!(kernel.vmlinux.is_none());
    let names: Vec<String> = kernel
        .modules
        .iter()
        .map(|m| {
            Path::new(m)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .split(".ko")
                .next()
                .unwrap()
                .replace('-', "_")
        })
        .collect();
    for want in ["virtio_mmio", "virtio_blk", "vmw_vsock_virtio_transport"] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    let pos = |n: &str| names.iter().position(|m| m == n);
    assert!(
        pos("vsock") < pos("vmw_vsock_virtio_transport"),
        "vsock loads before its transport: {names:?}"
    );
    for m in &kernel.modules {
        assert!(kernel.dir.join(m).is_file(), "{m} is in the kernel entry");
    }
    let initramfs = build_initramfs(&cache, &kernel).unwrap();
    let listing = cpio_listing(&initramfs.path);
    for m in &kernel.modules {
        assert!(
            listing.iter().any(|(_, p)| p == m),
            "{m} is in the initramfs"
        );
    }
}
