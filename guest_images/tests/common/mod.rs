//! Helpers shared by the image tests: reading ext4 images with e2fsprogs' `debugfs` and
//! the caches the tests build into.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;
use std::process::Command;

use kindling_images::Cache;

/// The user's cache (`$XDG_CACHE_HOME/kindling`), shared with `kindling images build` so
/// that the big builds (kernel, debootstrap) happen once per machine.
pub fn shared_cache() -> Cache {
    Cache::open().expect("the cache opens")
}

/// A throwaway cache for small builds whose every step the test wants to see.
pub fn temp_cache() -> (tempfile::TempDir, Cache) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Cache::at(dir.path().join("cache")).expect("cache");
    (dir, cache)
}

/// Runs one debugfs request against an image, read-only; panics on failure.
pub fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs) runs");
    assert!(
        out.status.success(),
        "debugfs -R {request:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(name, octal mode)` of the entries of a folder in an ext4 image (`ls -p`).
pub fn ls(image: &Path, dir: &str) -> Vec<(String, u32)> {
    debugfs(image, &format!("ls -p {dir}"))
        .lines()
        .filter_map(|line| {
            // /inode/mode/uid/gid/name/size/
            let fields: Vec<&str> = line.split('/').collect();
            (fields.len() >= 7).then(|| {
                (
                    fields[5].to_string(),
                    u32::from_str_radix(fields[2], 8).unwrap(),
                )
            })
        })
        .filter(|(name, _)| name != "." && name != "..")
        .collect()
}

/// The mode of one path in an image.
pub fn mode_of(image: &Path, path: &str) -> u32 {
    let (dir, name) = path.rsplit_once('/').unwrap();
    let dir = if dir.is_empty() { "/" } else { dir };
    ls(image, dir)
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{path} is not in {}", image.display()))
        .1
}

/// The contents of one file in an image.
pub fn cat(image: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}
