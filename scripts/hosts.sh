#!/usr/bin/env bash
# Two "hosts" on this machine for a protected VM: network namespaces <name>a (primary host) and
# <name>b (backup host), joined by a veth pair that carries replication (QUIC), and both attached
# to a clients' LAN bridge in the caller's namespace, like two servers on one switch.
#
#   caller ns:    bridge <name>lan  10.77.<index>.1/24          (clients live here)
#   netns <name>a: br0 = { tap0, veth to <name>lan }             guest 10.77.<index>.2 runs here...
#                 <name>ar  10.79.<index>.1/30  ── veth ──┐
#   netns <name>b: br0 = { tap0, veth to <name>lan }       │      ...or here after a failover
#                 <name>br  10.79.<index>.2/30  ──────────┘     (the backup listens on it)
#
# The guest keeps its address and MAC wherever it runs; after a restore it sends a gratuitous
# ARP, so the LAN bridge and the clients learn its new port.
#
# Usage: hosts.sh up <name> <index 1..250>   |   hosts.sh down <name>     (name ≤ 8 characters)
set -euo pipefail
source "$(dirname "$0")/net-lib.sh"

cmd=${1:?usage: hosts.sh up|down <name> [index]}
name=${2:?missing name}
if [ ${#name} -gt 8 ]; then echo "hosts.sh: name '$name' longer than 8 characters" >&2; exit 2; fi

down() {
  ip netns del "${name}a" 2>/dev/null || true
  ip netns del "${name}b" 2>/dev/null || true
  for l in "${name}lan" "${name}ah" "${name}bh" "${name}ar"; do ip link del "$l" 2>/dev/null || true; done
}

case "$cmd" in
  up)
    index=${3:?missing index}
    check_index "$index" hosts.sh
    down
    require_free_subnet "10.77.$index" hosts.sh
    ip link add "${name}lan" type bridge
    ip link set "${name}lan" type bridge forward_delay 0 stp_state 0
    ip addr add "10.77.$index.1/24" dev "${name}lan"
    ip link set "${name}lan" up
    for h in a b; do
      ns="${name}$h"
      ip netns add "$ns"
      ip link add "${name}${h}h" type veth peer name "${name}${h}n"
      ip link set "${name}${h}n" netns "$ns"
      ip link set "${name}${h}h" master "${name}lan"
      ip link set "${name}${h}h" up
      ip netns exec "$ns" sh -e -c "
        ip link set lo up
        ip link add br0 type bridge
        ip link set br0 type bridge forward_delay 0 stp_state 0
        ip tuntap add dev tap0 mode tap
        ip link set tap0 master br0
        ip link set ${name}${h}n master br0
        ip link set tap0 up
        ip link set ${name}${h}n up
        ip link set br0 up"
    done
    # The replication link between the two hosts.
    ip link add "${name}ar" type veth peer name "${name}br"
    ip link set "${name}ar" netns "${name}a"
    ip link set "${name}br" netns "${name}b"
    ip -n "${name}a" addr add "10.79.$index.1/30" dev "${name}ar"
    ip -n "${name}b" addr add "10.79.$index.2/30" dev "${name}br"
    ip -n "${name}a" link set "${name}ar" up
    ip -n "${name}b" link set "${name}br" up
    ;;
  down)
    down
    ;;
  *)
    echo "usage: hosts.sh up|down <name> [index]" >&2; exit 2;;
esac
