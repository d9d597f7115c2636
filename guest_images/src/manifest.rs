//! A manifest of built images: the paths `kindling images build --manifest FILE` produced,
//! which `kindling serve --images FILE` boots as they are. The cache's own lookups hash their
//! inputs (Debian package versions, the kernel source), which needs Debian's tools; a host
//! that only runs functions from images built elsewhere (or a test harness's nested host)
//! has none of them, and needs only this file and the images it names.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::rootfs::Runtime;

/// Boot files and root images, by runtime name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesManifest {
    /// The guest kernel (`bzImage`).
    pub kernel: PathBuf,
    /// Its initramfs.
    pub initramfs: PathBuf,
    pub runtimes: BTreeMap<String, RootPaths>,
}

/// One runtime's root image in both forms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootPaths {
    /// The ext4 filesystem a microVM boots.
    pub ext4: PathBuf,
    /// The folder a sandbox uses as its root.
    pub dir: PathBuf,
}

impl ImagesManifest {
    /// Reads a manifest and checks that every file a microVM boots is there (a root folder
    /// is checked when a sandbox of its runtime starts: a microVM-only host needs none).
    pub fn load(path: &Path) -> Result<ImagesManifest> {
        let text = fs::read(path)
            .with_context(|| format!("cannot read the images manifest {}", path.display()))?;
        let manifest: ImagesManifest = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not an images manifest", path.display()))?;
        let roots = manifest.runtimes.values();
        for file in [&manifest.kernel, &manifest.initramfs]
            .into_iter()
            .chain(roots.map(|r| &r.ext4))
        {
            if !file.exists() {
                bail!(
                    "{} names {}, which is missing",
                    path.display(),
                    file.display()
                );
            }
        }
        Ok(manifest)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        fs::write(path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// The root image of `runtime`, or why the manifest has none.
    pub fn root(&self, runtime: Runtime) -> Result<&RootPaths> {
        self.runtimes.get(runtime.name()).with_context(|| {
            format!(
                "the images manifest has no root image for runtime {}; build it with `kindling images build --runtime {} --manifest FILE`",
                runtime.name(),
                runtime.name()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_round_trips_and_a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let path = dir.path().join(name);
            fs::write(&path, b"x").unwrap();
            path
        };
        let manifest = ImagesManifest {
            kernel: file("bzImage"),
            initramfs: file("initramfs"),
            runtimes: [(
                "python".to_string(),
                RootPaths {
                    ext4: file("rootfs.ext4"),
                    dir: dir.path().to_path_buf(),
                },
            )]
            .into(),
        };
        let path = dir.path().join("images.json");
        manifest.save(&path).unwrap();
        let loaded = ImagesManifest::load(&path).unwrap();
        assert_eq!(loaded, manifest);
        assert!(loaded.root(Runtime::Python).is_ok());
        let err = loaded.root(Runtime::Node).unwrap_err().to_string();
        assert!(err.contains("no root image for runtime node"), "{err}");

        fs::remove_file(dir.path().join("initramfs")).unwrap();
        let err = ImagesManifest::load(&path).unwrap_err().to_string();
        assert!(err.contains("initramfs, which is missing"), "{err}");
    }
}
