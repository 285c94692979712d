#!/usr/bin/env bash
# Test network for one guest: a network namespace holding a bridge that joins the guest's tap
# device to a veth pair whose other end stays in the caller's namespace.
#
#   host ns:  <name>-h  10.77.<index>.1/24
#   netns <name>:  br0 = { <name>-n, tap0 }, br0 itself 10.77.<index>.3/24 (processes in the
#                  namespace, e.g. a backup, are reachable from the host there)
#   guest: 10.77.<index>.2/24, gw 10.77.<index>.1
#
# Usage: netns.sh up <name> <index 1..250>   |   netns.sh down <name>
# The VMM then runs inside the namespace: ip netns exec <name> vmatrix run --tap tap0 ...
set -euo pipefail
source "$(dirname "$0")/net-lib.sh"

cmd=${1:?usage: netns.sh up|down <name> [index]}
name=${2:?missing namespace name}
if [ ${#name} -gt 12 ]; then echo "netns.sh: name '$name' longer than 12 characters" >&2; exit 2; fi

down() {
  ip netns del "$name" 2>/dev/null || true
  ip link del "$name-h" 2>/dev/null || true
}

case "$cmd" in
  up)
    index=${3:?missing index}
    check_index "$index" netns.sh
    down
    # Another interface holding this subnet would capture the guest's traffic: refuse clearly.
    require_free_subnet "10.77.$index" netns.sh
    ip netns add "$name"
    ip link add "$name-h" type veth peer name "$name-n"
    ip link set "$name-n" netns "$name"
    ip netns exec "$name" sh -e -c "
      ip link set lo up
      ip link add br0 type bridge
      ip link set br0 type bridge forward_delay 0 stp_state 0
      ip tuntap add dev tap0 mode tap
      ip link set tap0 master br0
      ip link set $name-n master br0
      ip link set tap0 up
      ip link set $name-n up
      ip link set br0 up
      ip addr add 10.77.$index.3/24 dev br0"
    ip addr add "10.77.$index.1/24" dev "$name-h"
    ip link set "$name-h" up
    ;;
  down)
    down
    ;;
  *)
    echo "usage: netns.sh up|down <name> [index]" >&2; exit 2;;
esac
