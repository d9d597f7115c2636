#!/usr/bin/env bash
# Builds the static binaries into target/x86_64-unknown-linux-gnu/release/: the guest's
# (init, kindling-bootstrap), kindling-vmm with kindling-jailer, which run it in a chroot
# that holds no libraries, and `bootstrap`, the lambda_runtime program of
# tests/lambda-rs-runtime that `kindling bench` runs as its `provided` no-op. An explicit
# --target keeps crt-static away from build scripts and proc macros, which must stay dynamic.
set -euo pipefail
cd "$(dirname "$0")/.."
unset CARGO_TARGET_DIR
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --target x86_64-unknown-linux-gnu -p kindling-init -p kindling-bootstrap \
  -p kindling-vmm -p kindling-jailer -p kindling-test-lambda-rs-runtime "$@"
