#!/usr/bin/env bash
# The test command: sets up a fresh machine (scripts/setup.sh), builds the guest images,
# then runs every test of the workspace and the lint gates. Needs root (namespaces, KVM).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
echo "test: building the guest images (cached after the first run)"
./target/release/kindling images build
echo "test: lint"
cargo fmt --all --check
cargo clippy --quiet --workspace --all-targets -- -D warnings
echo "test: cargo test"
# --show-output: the one-line "SKIPPED: <why>" of a test that cannot run here is shown.
cargo test --release --workspace -- --show-output 2>&1
