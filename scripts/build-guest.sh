#!/usr/bin/env bash
# Builds the static guest binaries (init, kindling-bootstrap) into
# target/x86_64-unknown-linux-gnu/release/. An explicit --target keeps crt-static away
# from build scripts and proc macros, which must stay dynamic.
set -euo pipefail
cd "$(dirname "$0")/.."
unset CARGO_TARGET_DIR
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --target x86_64-unknown-linux-gnu -p kindling-init -p kindling-bootstrap "$@"
