#!/usr/bin/env bash
# The test command: sets up a fresh machine (scripts/setup.sh), builds the guest images,
# then runs every test of the workspace and the lint gates. Needs root (namespaces, KVM).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
echo "test: building the guest images (cached after the first run)"
# --nested-host: the level-1 host of the nested-KVM harness, in which the VMM's Linux tests
# run where this machine's KVM cannot boot Linux (kindling-nested-kvm).
images=$(./target/release/kindling images build --nested-host | tee /dev/stderr)
# The VMM's boot-parameter and Linux boot tests load these.
KINDLING_KERNEL=$(awk '$1 == "kernel" && $2 == "minimal" {print $NF}' <<<"$images")
KINDLING_INITRD=$(awk '$1 == "initramfs" {print $NF}' <<<"$images")
KINDLING_ROOTFS=$(awk '$1 == "rootfs" && $2 == "provided" {print $NF}' <<<"$images")
export KINDLING_KERNEL KINDLING_INITRD KINDLING_ROOTFS
echo "test: lint"
cargo fmt --all --check
cargo clippy --quiet --workspace --all-targets -- -D warnings
echo "test: cargo test"
# --show-output: the one-line "SKIPPED: <why>" of a test that cannot run here is shown.
cargo test --release --workspace -- --show-output 2>&1
