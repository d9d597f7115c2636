//! The shipped runtimes' shims (`guest_images/runtimes/<name>/`), compiled in: they become
//! the guest's `/var/runtime`, in root images and in sandboxes, with no source checkout
//! needed at run time.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};

use crate::cache::{sha256_hex, Fingerprint};
use crate::rootfs::Runtime;

/// Where a root image keeps its shims compiled, relative to its root: Python's
/// `__pycache__` of `/var/runtime`, made by the image's own interpreter (checked-hash
/// `.pyc` files, used only while they match the shim's source). A sandbox, which writes
/// the shims afresh, shows this folder beside them.
pub const COMPILED_SHIMS_DIR: &str = "var/runtime/__pycache__";

/// One file of a runtime's shims.
#[derive(Debug, Clone, Copy)]
pub struct ShimFile {
    pub name: &'static str,
    /// Mode 0755 when set, else 0644.
    pub executable: bool,
    pub contents: &'static [u8],
}

impl ShimFile {
    fn mode(self) -> u32 {
        if self.executable {
            0o755
        } else {
            0o644
        }
    }
}

/// Sorted by name, as [`Fingerprint::tree`] walks a folder.
const PYTHON: &[ShimFile] = &[
    ShimFile {
        name: "bootstrap",
        executable: true,
        contents: include_bytes!("../runtimes/python/bootstrap"),
    },
    ShimFile {
        name: "kindling_runtime.py",
        executable: false,
        contents: include_bytes!("../runtimes/python/kindling_runtime.py"),
    },
];

/// Sorted by name, as [`Fingerprint::tree`] walks a folder.
const NODE: &[ShimFile] = &[
    ShimFile {
        name: "bootstrap",
        executable: true,
        contents: include_bytes!("../runtimes/node/bootstrap"),
    },
    ShimFile {
        name: "kindling_runtime.js",
        executable: false,
        contents: include_bytes!("../runtimes/node/kindling_runtime.js"),
    },
];

impl Runtime {
    /// The shims this runtime puts beside `kindling-bootstrap` in `/var/runtime`; none for
    /// the custom runtimes, whose function brings its own `bootstrap`.
    pub fn shims(self) -> &'static [ShimFile] {
        match self {
            Runtime::Provided | Runtime::ProvidedDebian => &[],
            Runtime::Python => PYTHON,
            Runtime::Node => NODE,
        }
    }
}

/// Writes `shims` into the folder `dir` (created if missing), root-owned when run as root.
pub fn write_shims(shims: &[ShimFile], dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for shim in shims {
        let path = dir.join(shim.name);
        fs::write(&path, shim.contents)
            .with_context(|| format!("cannot write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(shim.mode()))?;
    }
    Ok(())
}

/// Adds `shims` to a cache key exactly as [`Fingerprint::tree`] adds the checkout folder
/// they are compiled from (a 0755 folder of 0755 and 0644 files, as git checks them out
/// under the usual umask), so images built before they were compiled in keep their keys.
pub(crate) fn fingerprint(fp: &mut Fingerprint, label: &str, shims: &[ShimFile]) {
    fp.str("tree", label).str("path", "").str("mode", "40755");
    for shim in shims {
        fp.str("path", shim.name)
            .str("mode", &format!("{:o}", 0o100_000 | shim.mode()))
            .str("data", &sha256_hex(shim.contents));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_in_shims_are_the_checkouts_files() {
        for runtime in Runtime::ALL {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("runtimes")
                .join(runtime.name());
            let mut names: Vec<String> = fs::read_dir(&dir)
                .map(|read| {
                    read.map(|e| e.unwrap().file_name().into_string().unwrap())
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            let shims = runtime.shims();
            let compiled: Vec<&str> = shims.iter().map(|s| s.name).collect();
            assert_eq!(compiled, names, "{}", runtime.name());
            for shim in shims {
                let path = dir.join(shim.name);
                assert_eq!(
                    shim.contents,
                    fs::read(&path).unwrap(),
                    "{}",
                    path.display()
                );
                let mode = fs::metadata(&path).unwrap().permissions().mode();
                assert_eq!(shim.executable, mode & 0o100 != 0, "{}", path.display());
            }
        }
    }

    #[test]
    fn the_key_of_compiled_in_shims_is_that_of_their_folder() {
        for runtime in [Runtime::Python, Runtime::Node] {
            let dir = tempfile::tempdir().unwrap();
            let folder = dir.path().join(runtime.name());
            write_shims(runtime.shims(), &folder).unwrap();
            fs::set_permissions(&folder, fs::Permissions::from_mode(0o755)).unwrap();
            let mut walked = Fingerprint::new("t");
            walked.tree("shims", &folder).unwrap();
            let mut compiled = Fingerprint::new("t");
            fingerprint(&mut compiled, "shims", runtime.shims());
            assert_eq!(walked.key(), compiled.key(), "{}", runtime.name());
        }
    }

    #[test]
    fn written_shims_keep_their_modes() {
        let dir = tempfile::tempdir().unwrap();
        write_shims(Runtime::Python.shims(), dir.path()).unwrap();
        let mode = |name: &str| {
            fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("bootstrap"), 0o755);
        assert_eq!(mode("kindling_runtime.py"), 0o644);
    }
}
