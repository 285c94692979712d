#!/usr/bin/env bash
# README's first command: set up everything on a fresh machine and run the demo.
#   packages -> build (workspace + guest) -> two "hosts" (network namespaces joined by a veth
#   pair, both on a clients' LAN bridge) -> certificates -> a backup on one host, a protected VM
#   on the other (QUIC with mutual TLS between them) -> a client stores keys -> the primary is
#   killed -> the backup's image resumes on its host -> every acknowledged key is there.
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
PKI=build/demo-pki
IMAGE=build/demo-image
LOGS=build/demo-logs
NAME=vmxd
IDX=1
GUEST=10.77.$IDX.2:7000
REPL_BACKUP=10.79.$IDX.2:7100
mkdir -p "$LOGS"
rm -rf "$IMAGE"
rm -f "$DISK" "$CONSOLE"
"$VMX" disk create "$DISK" --size-mib 64 >/dev/null

step "two hosts on this machine: namespaces ${NAME}a (primary) and ${NAME}b (backup)"
echo "  replication link: veth 10.79.$IDX.1 <-> 10.79.$IDX.2 (QUIC, mutual TLS)"
echo "  clients' LAN: bridge ${NAME}lan 10.77.$IDX.1/24 here; the guest is 10.77.$IDX.2 on either host"
"$ROOT/scripts/hosts.sh" up "$NAME" "$IDX"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$ROOT/scripts/hosts.sh" down "$NAME"
}
trap cleanup EXIT

step "cluster CA and host certificates ($PKI)"
rm -rf "$PKI"
"$VMX" certs init "$PKI" | sed 's/^/  /'
for h in primary backup; do "$VMX" certs issue "$PKI" --host "$h" | sed 's/^/  /'; done

step "backup on host ${NAME}b, listening on $REPL_BACKUP"
ip netns exec "${NAME}b" "$VMX" --log info backup --listen "$REPL_BACKUP" --image-dir "$IMAGE" \
  --certs "$PKI" --host backup 2> "$LOGS/backup.log" &
BACKUP_PID=$!; PIDS+=("$BACKUP_PID")

step "protected VM on host ${NAME}a: pre-copy initial sync, then a checkpoint every ~20 ms"
ip netns exec "${NAME}a" "$VMX" --log info primary --guest "$GUEST_ELF" --disk "$DISK" --tap tap0 \
  --mem-mib 64 --guest-config "ip=10.77.$IDX.2/24,gw=10.77.$IDX.1,port=7000" \
  --backup "backup@$REPL_BACKUP" --certs "$PKI" --host primary --control "$LOGS/primary.sock" \
  --console-log "$CONSOLE" 2> "$LOGS/primary.log" &
PRIMARY_PID=$!; PIDS+=("$PRIMARY_PID")
for _ in $(seq 1 200); do grep -q "protected after" "$LOGS/primary.log" 2>/dev/null && break; sleep 0.05; done
grep -E "pre-copy round|final pause|protected" "$LOGS/primary.log" | sed -E 's/^.* primary: //; s/^/  /'

step "a client stores 200 keys; each OK means the backup holds that write"
acked=$(for i in $(seq 1 200); do echo "SET key$i value-$i"; done \
  | "$VMX" kv --addr "$GUEST" | grep -c -- '-> OK$' || true)
echo "  $acked writes acknowledged"
"$VMX" ctl "$LOGS/primary.sock" status | python3 -c 'import json, sys
st = json.load(sys.stdin)
for k in ("epochs", "acked_epoch", "epoch_us", "pause_p50_us", "pause_p99_us", "dirty_pages_sent", "bytes_sent", "ack_latency_us"):
    print(f"  {k}={st[k]}")'

step "the primary's host crashes (SIGKILL)"
kill -9 "$PRIMARY_PID"; wait "$PRIMARY_PID" 2>/dev/null || true
echo "  primary gone; its clients' unacknowledged output never left the host"

step "failover: the backup finalizes its image and the VM resumes on host ${NAME}b"
kill -TERM "$BACKUP_PID"; wait "$BACKUP_PID" 2>/dev/null || true
tail -n 1 "$LOGS/backup.log" | sed 's/^/  /'
start=$(date +%s%N)
ip netns exec "${NAME}b" "$VMX" restore "$IMAGE" --tap tap0 --console-log "$LOGS/restored-console.log" \
  2> "$LOGS/restored.log" &
PIDS+=("$!")
"$VMX" kv --addr "$GUEST" COUNT >/dev/null
echo "  guest answering on host ${NAME}b after $(( ($(date +%s%N) - start) / 1000000 )) ms, same address $GUEST"

step "every acknowledged key is there"
present=$(for i in $(seq 1 200); do echo "GET key$i"; done | "$VMX" kv --addr "$GUEST" \
  | grep -c -- '-> VALUE value-' || true)
echo "  $present of $acked acknowledged keys present after the failover"
"$VMX" kv --addr "$GUEST" "GET key1" "GET key200" "COUNT" | sed 's/^/  /'
if [ "$present" -lt "$acked" ]; then
  echo "demo FAILED: acknowledged writes were lost" >&2; exit 1
fi

step "done: logs in $LOGS; next, scripts/test.sh runs the whole test suite"
