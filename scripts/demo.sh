#!/usr/bin/env bash
# README's first command: set up everything on a fresh machine and run the failover demo.
#   packages -> build (workspace + guest) -> three "hosts" (network namespaces on a replication
#   network and a clients' LAN; scripts/cluster.sh) -> certificates -> the manager here and an
#   agent on every host -> a protected VM created through the manager -> a client keeps writing
#   on one TCP connection -> the primary's whole host crashes -> automatic failover -> the same
#   connection carries on -> re-protection on the third host -> every acknowledged write is there.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_packages

step "building vmatrix (release)"
cargo build --locked --release -p vmatrix 2>&1 | tail -n 2
build_guest
VMX="$ROOT/target/release/vmatrix"

NAME=vmxd
IDX=1
OUT=build/demo
PKI=$OUT/pki
GUEST=10.77.$IDX.2:7000
MGR=10.78.$IDX.254:7700
export VMATRIX_MANAGER=127.0.0.1:7799
rm -rf "$OUT"; mkdir -p "$OUT"

step "three hosts on this machine: namespaces ${NAME}a, ${NAME}b, ${NAME}c"
echo "  replication/management network 10.78.$IDX.0/24 (the manager listens on $MGR)"
echo "  clients' LAN 10.77.$IDX.0/24; the guest is $GUEST on whichever host runs it"
"$ROOT/scripts/cluster.sh" up "$NAME" "$IDX" 3
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$ROOT/scripts/cluster.sh" down "$NAME"
}
trap cleanup EXIT

step "cluster CA, the manager's and the agents' certificates ($PKI)"
"$VMX" certs init "$PKI" | sed 's/^/  /'
"$VMX" certs issue "$PKI" --host manager --role manager | sed 's/^/  /'
for h in a b c; do
  "$VMX" certs issue "$PKI" --host "$h" --role agent --role primary --role backup | sed 's/^/  /'
done

step "the manager (state in $OUT/manager.state, API on $VMATRIX_MANAGER) and an agent per host"
"$VMX" --log info manager --listen "$MGR" --api "$VMATRIX_MANAGER" --state "$OUT/manager.state" \
  --events "$OUT/events.jsonl" --certs "$PKI" --host manager 2> "$OUT/manager.log" &
PIDS+=("$!")
i=1
for h in a b c; do
  ip netns exec "${NAME}$h" "$VMX" --log info agent --manager "$MGR" --certs "$PKI" --host "$h" \
    --repl-ip "10.78.$IDX.$i" --state-dir "$OUT/host-$h" --guest "$GUEST_ELF" \
    2> "$OUT/agent-$h.log" &
  PIDS+=("$!"); i=$((i + 1))
done
for _ in $(seq 1 100); do
  [ "$("$VMX" host list 2>/dev/null | grep -c ' up')" -ge 3 ] && break; sleep 0.1
done
"$VMX" host list | sed 's/^/  /'

step "a protected VM: vmatrix vm create web --backups 1"
"$VMX" vm create web --mem-mib 64 --disk-mib 16 --backups 1 --port 7100 \
  --guest-config "ip=10.77.$IDX.2/24,gw=10.77.$IDX.1,port=7000" | sed 's/^/  /'
for _ in $(seq 1 300); do
  "$VMX" vm list 2>/dev/null | grep -q ' protected ' && break; sleep 0.1
done
"$VMX" vm list | sed 's/^/  /'
PRIMARY=$("$VMX" vm show web | python3 -c 'import json,sys; print(json.load(sys.stdin)["primary"])')

step "a client writes 400 keys on one TCP connection; meanwhile host ${NAME}$PRIMARY crashes"
"$VMX" kv --addr "$GUEST" --write-loop 400 --every-ms 10 --prefix key > "$OUT/client.txt" &
CLIENT=$!
sleep 1.5
echo "  $(date +%T.%3N) host $PRIMARY crashes: its links go down and every process in it is killed"
"$ROOT/scripts/cluster.sh" kill "$NAME" "$PRIMARY"
status=0; wait "$CLIENT" || status=$?
sed 's/^/  /' "$OUT/client.txt"

step "what the manager did (vmatrix events)"
"$VMX" events | sed 's/^/  /'

step "re-protected on the third host"
for _ in $(seq 1 300); do
  "$VMX" vm list 2>/dev/null | grep -q ' protected ' && break; sleep 0.1
done
"$VMX" vm list | sed 's/^/  /'
if [ "$status" -ne 0 ]; then
  echo "demo FAILED: acknowledged writes were lost (client exit $status)" >&2; exit 1
fi

TARGET=$("$VMX" vm show web | python3 -c 'import json,sys; print(json.load(sys.stdin)["backups"][0]["host"])')
step "planned migration to host ${NAME}$TARGET while the client writes (vmatrix vm migrate)"
"$VMX" kv --addr "$GUEST" --write-loop 300 --every-ms 10 --prefix moved > "$OUT/client2.txt" &
CLIENT=$!
sleep 1
"$VMX" vm migrate web --to "$TARGET" | sed 's/^/  /'
status=0; wait "$CLIENT" || status=$?
sed 's/^/  /' "$OUT/client2.txt"
"$VMX" events --since 13 | sed 's/^/  /'
if [ "$status" -ne 0 ]; then
  echo "demo FAILED: acknowledged writes were lost in the migration (client exit $status)" >&2; exit 1
fi
step "done: logs in $OUT; scripts/test.sh runs the whole test suite"
