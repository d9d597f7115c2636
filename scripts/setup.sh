#!/usr/bin/env bash
# Installs what Kindling needs on a fresh Debian 12 machine (as root) and builds it:
# Debian packages, rust-vmm's vhost-device-vsock, the static guest binaries and the host
# tools. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  # images: kernel build, root images, initramfs
  linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev lz4 xz-utils kmod cpio
  e2fsprogs debootstrap
  # microVMs on hosts whose KVM cannot boot a kernel
  qemu-system-x86
  # sandbox and tests
  util-linux iproute2 curl python3 nodejs
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v vhost-device-vsock >/dev/null; then
  echo "setup: cargo install vhost-device-vsock (about a minute)"
  cargo install --quiet --locked vhost-device-vsock@0.3.0
fi

echo "setup: building the static guest binaries"
./scripts/build-guest.sh --quiet
echo "setup: building the host tools"
cargo build --quiet --release --workspace
