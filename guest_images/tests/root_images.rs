//! Root images: the `provided` image's contents read back from its ext4 file, cache hits,
//! and (with debootstrap, as root) the Debian-based runtimes actually running their
//! interpreters.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::{cat, debugfs, ls, mode_of, shared_cache, temp_cache};
use kindling_images::{build_root_image, is_static_elf, locate, ImageInfo, Runtime};

#[test]
fn provided_image_holds_static_init_bootstrap_and_mount_points() {
    let (dir, cache) = temp_cache();
    let image = build_root_image(&cache, Runtime::Provided)
        .expect("build the provided image (run scripts/build-guest.sh first)");
    assert!(!image.cached);

    let init = dir.path().join("init");
    debugfs(&image.ext4, &format!("dump /sbin/init {}", init.display()));
    assert!(
        is_static_elf(&init).unwrap(),
        "/sbin/init in the image must be static"
    );
    let bins = locate::guest_bin_dir().unwrap();
    assert_eq!(
        std::fs::read(&init).unwrap(),
        std::fs::read(bins.join("init")).unwrap()
    );
    assert_eq!(mode_of(&image.ext4, "/sbin/init"), 0o100755);
    assert_eq!(
        mode_of(&image.ext4, "/var/runtime/kindling-bootstrap"),
        0o100755
    );
    for (dir, mode) in [
        ("/var/task", 0o40755),
        ("/opt", 0o40755),
        ("/tmp", 0o41777),
        ("/proc", 0o40555),
        ("/dev", 0o40755),
    ] {
        assert_eq!(mode_of(&image.ext4, dir), mode, "{dir}");
    }
    assert!(
        ls(&image.ext4, "/var/task").is_empty(),
        "/var/task is an empty mount point"
    );
    let info: ImageInfo =
        serde_json::from_slice(&cat(&image.ext4, "/etc/kindling/image.json")).unwrap();
    assert_eq!(info.runtime, Runtime::Provided);
    assert!(info.debian.is_none());
    let init_json: serde_json::Value =
        serde_json::from_slice(&cat(&image.ext4, "/etc/kindling/init.json")).unwrap();
    assert_eq!(
        init_json["task"], "/dev/vdb",
        "init mounts the code drive at /var/task"
    );
    assert_eq!(
        init_json["mounts"],
        serde_json::json!([{"source": "/dev/vdc", "target": "/opt", "fstype": "ext4",
                            "options": "ro,nodev,nosuid", "optional": true}]),
        "init mounts the layers' drive, when there is one, at /opt"
    );
    assert_eq!(
        init_json.as_object().unwrap().len(),
        2,
        "the command line stays in charge of the rest"
    );
    assert!(String::from_utf8(cat(&image.ext4, "/etc/hosts"))
        .unwrap()
        .contains("127.0.0.1\tlocalhost"));
    // The folder form matches the ext4 form.
    assert!(image.dir.join("var/runtime/kindling-bootstrap").is_file());
    assert!(image.dir.join("var/task").is_dir());

    let started = Instant::now();
    let again = build_root_image(&cache, Runtime::Provided).unwrap();
    assert!(again.cached, "the second build must be a cache hit");
    assert!(
        started.elapsed().as_millis() < 1000,
        "a cache hit took {:?}",
        started.elapsed()
    );
    assert_eq!(again.ext4, image.ext4);
}

/// Runs `argv` inside an image's root folder with chroot.
fn in_root(root: &Path, argv: &[&str]) -> String {
    let out = Command::new("chroot")
        .arg(root)
        .args(argv)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{argv:?} failed in {}: {}",
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether this machine can debootstrap; prints why not when it cannot.
fn can_debootstrap() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let tool = Command::new("debootstrap")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !(root && tool) {
        println!("SKIPPED: Debian runtime images need root and debootstrap (apt-get install debootstrap)");
    }
    root && tool
}

#[test]
fn debian_runtime_images_run_their_interpreters() {
    if !can_debootstrap() {
        return;
    }
    let cache = shared_cache();
    let checks: [(Runtime, &[&str], &str); 3] = [
        (
            Runtime::ProvidedDebian,
            &[
                "/bin/bash",
                "-c",
                "curl --version && ls /etc/ssl/certs/ca-certificates.crt",
            ],
            "curl",
        ),
        (
            Runtime::Python,
            &[
                "/usr/bin/python3",
                "-c",
                "import json; print(json.dumps({'ok': 1}))",
            ],
            "{\"ok\": 1}",
        ),
        (
            Runtime::Node,
            &[
                "/usr/local/bin/node",
                "-e",
                "console.log(JSON.stringify({ok: 1, node: process.versions.node}))",
            ],
            &format!(
                "{{\"ok\":1,\"node\":\"{}\"}}",
                kindling_images::NODE_VERSION
            ),
        ),
    ];
    for (runtime, argv, want) in checks {
        let image = build_root_image(&cache, runtime)
            .unwrap_or_else(|e| panic!("{}: {e:#}", runtime.name()));
        assert!(
            in_root(&image.dir, argv).contains(want),
            "{}",
            runtime.name()
        );
        // merged /usr: /sbin is a link to usr/sbin in Debian roots
        assert_eq!(mode_of(&image.ext4, "/sbin") & 0o170000, 0o120000);
        assert_eq!(mode_of(&image.ext4, "/usr/sbin/init"), 0o100755);
        assert_eq!(
            mode_of(&image.ext4, "/var/runtime/kindling-bootstrap"),
            0o100755
        );
        let info: ImageInfo =
            serde_json::from_slice(&cat(&image.ext4, "/etc/kindling/image.json")).unwrap();
        assert_eq!(info.runtime, runtime);
        assert!(info.debian.unwrap().packages.len() >= 2);
        let ext4_bytes = std::fs::metadata(&image.ext4).unwrap().len();
        let dir_bytes: u64 = walk_bytes(&image.dir);
        assert!(
            ext4_bytes < dir_bytes * 2 + (64 << 20),
            "{} ext4 is oversized: {ext4_bytes} for {dir_bytes}",
            runtime.name()
        );
    }
}

fn walk_bytes(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

#[test]
fn prune_keeps_current_entries_and_removes_stale_ones() {
    let (dir, cache) = temp_cache();
    let current = build_root_image(&cache, Runtime::Provided).unwrap();
    let code_src = dir.path().join("fn");
    std::fs::create_dir(&code_src).unwrap();
    std::fs::write(code_src.join("app.py"), "").unwrap();
    let code = kindling_images::build_code_image(&cache, &code_src, Runtime::Python, "app.handler")
        .unwrap();
    let stale = cache.root().join("rootfs/provided-0000000000000000");
    std::fs::create_dir_all(stale.join("rootfs")).unwrap();
    let dead_tmp = cache.root().join("tmp/provided-1.4294967295.1");
    std::fs::create_dir_all(&dead_tmp).unwrap();

    let removed = kindling_images::prune(&cache, false).unwrap();
    assert!(
        removed.contains(&stale) && removed.contains(&dead_tmp),
        "{removed:?}"
    );
    assert!(!stale.exists() && !dead_tmp.exists() && !code.ext4.exists());
    assert!(current.ext4.is_file(), "the current provided image stays");
    assert!(build_root_image(&cache, Runtime::Provided).unwrap().cached);

    kindling_images::prune(&cache, true).unwrap();
    assert!(!current.ext4.exists());
    assert!(cache.list().unwrap().is_empty());
}
