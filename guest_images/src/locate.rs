//! Where this checkout keeps the pieces every guest needs: the static guest binaries
//! (`init`, `kindling-bootstrap`) and the runtime shims that become `/var/runtime`.

use std::env;
use std::path::{Path, PathBuf};

/// Cargo's output folder for the static guest binaries (`scripts/build-guest.sh`).
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu/release";

/// The folder holding the static `init` and `kindling-bootstrap` binaries:
/// `$KINDLING_GUEST_BIN_DIR`, else the `target/` of the checkout that the running
/// program was built in.
pub fn guest_bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = env::var_os("KINDLING_GUEST_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let from_exe = env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .find(|d| d.ends_with("target"))
            .map(Path::to_path_buf)
    });
    let candidates = from_exe
        .into_iter()
        .chain([workspace_root().join("target")])
        .map(|target| target.join(GUEST_TARGET));
    for dir in candidates {
        if dir.join("init").is_file() && dir.join("kindling-bootstrap").is_file() {
            return Ok(dir);
        }
    }
    Err("the static guest binaries (init, kindling-bootstrap) are not built: run scripts/build-guest.sh \
         or set KINDLING_GUEST_BIN_DIR"
        .to_string())
}

/// The shims of a shipped runtime (`python`, `node`), which become the guest's `/var/runtime`.
pub fn runtime_shims(runtime: &str) -> Option<PathBuf> {
    let dir = workspace_root().join("guest_images/runtimes").join(runtime);
    dir.is_dir().then_some(dir)
}

/// The checkout this crate was built from.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("guest_images lives inside the workspace")
        .to_path_buf()
}
