#!/usr/bin/env bash
# A load balancer's namespace on the clients' LAN ("one address for the service", issue 11;
# docs/clones.md): network namespace <name> with one leg, lan0 = 10.77.<index>.4/24, a veth
# whose other end is a port of the LAN's bridge <bridge> (in namespace <bridge-ns>, or in the
# caller's if none is given). Forwarding on, ICMP redirects off (it forwards out the port it
# received on: a one-armed balancer). The load-balancer service then puts its VIP on lan0
# (vmatrix lb create --netns <name> --vip-dev lan0) and masquerades its connections to
# 10.77.<index>.4, so the servers' replies come back through it.
#
#   clients 10.77.<index>.1 ── LAN bridge ──┬── guest 10.77.<index>.2, clones .10, .11, ...
#                                            └── netns <name>: lan0 .4 + VIP (e.g. .100)
#
# Usage: lb-net.sh up <name> <index 1..250> <bridge> [<bridge-ns>]   |   lb-net.sh down <name>
set -euo pipefail
# shellcheck source=net-lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/net-lib.sh"

usage="usage: lb-net.sh up <name> <index> <bridge> [<bridge-ns>] | down <name>"
cmd=${1:?$usage}
name=${2:?missing name}
if [ ${#name} -gt 12 ]; then echo "lb-net.sh: name '$name' longer than 12 characters" >&2; exit 2; fi

case "$cmd" in
  up)
    index=${3:?missing index}
    bridge=${4:?missing bridge}
    bridge_ns=${5:-}
    check_index "$index" lb-net.sh
    ip netns del "$name" 2>/dev/null || true
    in_bridge_ns() { if [ -n "$bridge_ns" ]; then ip netns exec "$bridge_ns" "$@"; else "$@"; fi; }
    in_bridge_ns ip link show "$bridge" >/dev/null
    ip netns add "$name"
    # Both ends are made in the balancer's namespace; the LAN end then moves to the bridge's,
    # so a name taken there by something else cannot get in the way until the move.
    ip -n "$name" link add "$name-l" type veth peer name lan0
    if [ -n "$bridge_ns" ]; then
      ip -n "$name" link set "$name-l" netns "$bridge_ns"
    else
      ip -n "$name" link set "$name-l" netns 1
    fi
    in_bridge_ns ip link set "$name-l" master "$bridge"
    in_bridge_ns ip link set "$name-l" up
    ip netns exec "$name" sh -e -c "
      ip link set lo up
      ip addr add 10.77.$index.4/24 dev lan0
      ip link set lan0 up
      ip route add default via 10.77.$index.1
      sysctl -qw net.ipv4.ip_forward=1
      sysctl -qw net.ipv4.conf.all.send_redirects=0
      sysctl -qw net.ipv4.conf.lan0.send_redirects=0"
    ;;
  down)
    # The veth pair goes with the namespace.
    ip netns del "$name" 2>/dev/null || true
    ;;
  *)
    echo "$usage" >&2; exit 2;;
esac
