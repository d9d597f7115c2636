#!/usr/bin/env bash
# The main job: set up this machine, build the guest images, boot microVMs for the
# bundled example functions and invoke them, printing their answers and REPORT lines.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
kindling=./target/release/kindling
$kindling images build

state=$(mktemp -d /tmp/kindling-demo.XXXXXX)
log="$state/serve.log"
$kindling serve --functions examples/functions.toml --addr 127.0.0.1:9000 --state-dir "$state" >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$state"' EXIT
for _ in $(seq 100); do
  grep -q "serving" "$log" && break
  kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done

invoke() {
  echo "\$ kindling invoke $1 --payload '$2'"
  $kindling invoke "$1" --payload "$2"
}
invoke hello '{"name": "Kindling"}'
invoke hello '{"name": "again (warm)"}'
invoke echo '{"hello": "from bash"}'

echo
echo "--- where they ran ---"
grep -E "microVMs run on|hypervisor chosen|microVM started" "$log" | sed 's/^[^ ]* *//' || true
echo
echo "--- the functions' log (START / END / REPORT) ---"
grep -E "START|END|REPORT|greeting|Echoing" "$log" || true
