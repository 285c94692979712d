#!/usr/bin/env bash
# README's first command: set up everything on a fresh machine and run the demo.
#   packages -> build (workspace + guest) -> disk image -> network namespace with a tap ->
#   boot the guest -> store and read keys over TCP from the host -> stop the VM -> boot a new
#   VM on the same disk -> show the keys survived.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_packages

step "building vmatrix (release)"
cargo build --locked --release -p vmatrix 2>&1 | tail -n 2
build_guest
VMX="$ROOT/target/release/vmatrix"

mkdir -p build
DISK=build/demo-disk.img
CONSOLE=build/demo-console.log
NS=vmxdemo
IDX=1
GUEST_IP=10.77.$IDX.2
: > "$CONSOLE"
if [ ! -f "$DISK" ]; then
  step "creating a 64 MiB disk image"
  "$VMX" disk create "$DISK" --size-mib 64
fi

step "network: namespace $NS with bridge br0 = {tap0, veth}; host side 10.77.$IDX.1"
"$ROOT/scripts/netns.sh" up "$NS" "$IDX"
VM_PID=
cleanup() {
  [ -n "$VM_PID" ] && kill "$VM_PID" 2>/dev/null && wait "$VM_PID" 2>/dev/null || true
  "$ROOT/scripts/netns.sh" down "$NS"
}
trap cleanup EXIT

boot() {
  ip netns exec "$NS" "$VMX" run --guest "$GUEST_ELF" --disk "$DISK" --tap tap0 --mem-mib 64 \
    --guest-config "ip=$GUEST_IP/24,gw=10.77.$IDX.1,port=7000" --console-log "$CONSOLE" &
  VM_PID=$!
}

step "booting the guest (console: $CONSOLE)"
start=$(date +%s%N)
boot
"$VMX" kv --addr "$GUEST_IP:7000" COUNT >/dev/null
echo "KV port answering after $(( ($(date +%s%N) - start) / 1000000 )) ms"
sed 's/^/  guest| /' "$CONSOLE"

step "talking to the guest's key-value service over TCP"
stamp=$(date +%H%M%S)
"$VMX" kv --addr "$GUEST_IP:7000" "SET greeting hello-from-$stamp" "SET answer 42" \
  "GET greeting" "GET answer" "GET nothing-here" "COUNT" "BOGUS" "STATS"

step "stopping the VM (SIGTERM) and booting a new one on the same disk"
kill -TERM "$VM_PID"; wait "$VM_PID" || true
: > "$CONSOLE"
boot
"$VMX" kv --addr "$GUEST_IP:7000" "GET greeting" "GET answer" "COUNT"
grep 'log replayed' "$CONSOLE" | sed 's/^/  guest| /'

step "done: every acknowledged write came back from the disk log"
echo "next: scripts/test.sh runs the whole test suite"
