//! Where the static guest binaries (`init`, `kindling-bootstrap`) are. They are the one
//! input of every image that cannot be compiled into this library: cargo builds them for
//! another target (`scripts/build-guest.sh`), after this library may have been built.
//! The static `kindling-vmm` and `kindling-jailer`, which run in a chroot without
//! libraries, are built there too.

use std::env;
use std::path::{Path, PathBuf};

/// Cargo's output folder for the static guest binaries, below a `target/` folder.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu/release";

/// The folder holding the static `init` and `kindling-bootstrap` binaries:
/// `$KINDLING_GUEST_BIN_DIR` when set, else the first of these that holds both:
///
/// - the `target/` folder the running program sits in (a kindling built in a checkout
///   with `cargo build` finds the binaries `scripts/build-guest.sh` built beside it);
/// - the `target/` folder of the checkout this library was compiled in, for programs
///   cargo put elsewhere (`CARGO_TARGET_DIR`), such as tests; an installed kindling,
///   whose checkout is gone, sets `KINDLING_GUEST_BIN_DIR` instead.
///
/// The error names every folder it looked in.
pub fn guest_bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = env::var_os("KINDLING_GUEST_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let from_exe = env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .find(|d| d.ends_with("target"))
            .map(Path::to_path_buf)
    });
    let compiled_in = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|checkout| checkout.join("target"));
    let mut looked = Vec::new();
    for target in from_exe.into_iter().chain(compiled_in) {
        let dir = target.join(GUEST_TARGET);
        if dir.join("init").is_file() && dir.join("kindling-bootstrap").is_file() {
            return Ok(dir);
        }
        looked.push(dir.display().to_string());
    }
    Err(format!(
        "the static guest binaries (init, kindling-bootstrap) are not built (looked in {}): \
         run scripts/build-guest.sh or set KINDLING_GUEST_BIN_DIR",
        looked.join(" and ")
    ))
}
