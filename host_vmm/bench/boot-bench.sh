#!/usr/bin/env bash
# Boot-time benchmark: kindling-vmm against QEMU microvm, same kernel and initramfs, same
# machine, median of N runs each. The initramfs' init must stop the VM (reboot(2)), e.g. after
# printing a line. Prints one JSON line per run and a summary with the wall-time ratio.
#
# usage: boot-bench.sh KERNEL INITRD [RUNS=5]
#   env: KINDLING_VMM (default: target/release/kindling-vmm), QEMU (default: qemu-system-x86_64),
#        QEMU_ACCEL (default: kvm), MEM_MIB (default: 256)
# Only compare numbers taken in one run of this script on one machine.
set -euo pipefail
kernel=${1:?usage: boot-bench.sh KERNEL INITRD [RUNS]}
initrd=${2:?usage: boot-bench.sh KERNEL INITRD [RUNS]}
runs=${3:-5}
here=$(cd "$(dirname "$0")/../.." && pwd)
vmm=${KINDLING_VMM:-$here/target/release/kindling-vmm}
qemu=${QEMU:-qemu-system-x86_64}
accel=${QEMU_ACCEL:-kvm}
mem=${MEM_MIB:-256}
args="console=ttyS0 panic=1 pci=off random.trust_cpu=on"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

now_us() { echo $(( $(date +%s%N) / 1000 )); }

cat >"$work/config.json" <<JSON
{"boot-source": {"kernel_image_path": "$kernel", "initrd_path": "$initrd", "boot_args": "$args reboot=k"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": $mem}}
JSON

vmm_walls=()
for i in $(seq "$runs"); do
  start=$(now_us)
  "$vmm" --no-api --config-file "$work/config.json" --timings --serial-out "$work/vmm-console.log" \
    2>"$work/vmm-stderr.log" || { echo "kindling-vmm failed, see below" >&2; cat "$work/vmm-stderr.log" >&2; exit 1; }
  wall=$(( $(now_us) - start ))
  vmm_walls+=("$wall")
  timing=$(grep -o '{"kindling_vmm_timings".*}' "$work/vmm-stderr.log")
  echo "{\"run\":$i,\"vmm\":\"kindling-vmm\",\"wall_us\":$wall,\"detail\":$timing}"
done

qemu_walls=()
if command -v "$qemu" >/dev/null; then
  for i in $(seq "$runs"); do
    start=$(now_us)
    "$qemu" -M microvm,acpi=off -accel "$accel" -m "$mem" -smp 1 -nodefaults -no-user-config \
      -nographic -no-reboot -serial "file:$work/qemu-console.log" \
      -kernel "$kernel" -initrd "$initrd" -append "$args reboot=t" >/dev/null
    wall=$(( $(now_us) - start ))
    qemu_walls+=("$wall")
    echo "{\"run\":$i,\"vmm\":\"qemu-microvm\",\"wall_us\":$wall}"
  done
else
  echo "SKIPPED qemu: $qemu is not installed" >&2
fi

python3 - "${vmm_walls[*]}" "${qemu_walls[*]:-}" <<'PY'
import json, statistics, sys
vmm = [int(x) for x in sys.argv[1].split()]
qemu = [int(x) for x in sys.argv[2].split()] if len(sys.argv) > 2 and sys.argv[2] else []
out = {"median_wall_us": {"kindling-vmm": statistics.median(vmm)}}
if qemu:
    out["median_wall_us"]["qemu-microvm"] = statistics.median(qemu)
    out["qemu_over_kindling_ratio"] = round(statistics.median(qemu) / statistics.median(vmm), 2)
print(json.dumps({"summary": out}))
PY
