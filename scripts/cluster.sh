#!/usr/bin/env bash
# A cluster of up to five "hosts" on this machine, for the failover manager: network namespaces
# <name>a, <name>b, ... Each host has a tap for a guest on a bridge to the clients' LAN (as in
# hosts.sh), and an address on a shared replication/management network, where every host reaches
# every other host and the manager (which runs in the caller's namespace).
#
#   caller ns:     bridge <name>lan  10.77.<index>.1/24     (clients live here)
#                  bridge <name>rep  10.78.<index>.254/24   (the manager listens here)
#   netns <name>a: br0 = { tap0, lan0 ── veth ── <name>al on <name>lan }
#                  rep0 10.78.<index>.1/24 ── veth ── <name>ar on <name>rep
#   netns <name>b: the same with <name>bl, <name>br and 10.78.<index>.2, and so on (host i of
#                  a=1, b=2, ... has 10.78.<index>.<i>)
#
# The guest has 10.77.<index>.2/24 (gateway 10.77.<index>.1) on whichever host runs it.
#
# kill <name> <host> crashes a host as if it were pulled from the switch: its links go down
# (both ends of its LAN and replication veths), then every process in its namespace gets
# SIGKILL (the links go first, so no FIN, RST or ICMP of the dying processes reaches anybody).
# revive <name> <host> sets the links up again; the processes stay dead.
#
# Usage: cluster.sh up <name> <index 1..250> [hosts 1..5, default 3]
#        cluster.sh down <name>
#        cluster.sh kill <name> <host a..e>  |  cluster.sh revive <name> <host a..e>
# (name ≤ 6 characters)
set -euo pipefail
# shellcheck source=net-lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/net-lib.sh"

usage="usage: cluster.sh up <name> <index> [hosts] | down <name> | kill|revive <name> <host>"
cmd=${1:?$usage}
name=${2:?missing name}
if [ ${#name} -gt 6 ]; then echo "cluster.sh: name '$name' longer than 6 characters" >&2; exit 2; fi
letters=(a b c d e)

# SIGKILLs every process in namespace $1 and waits until they are gone.
kill_procs() {
  local ns=$1 tries=0 pids
  while mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null) && [ ${#pids[@]} -gt 0 ]; do
    kill -9 "${pids[@]}" 2>/dev/null || true
    tries=$((tries + 1))
    if [ $tries -gt 250 ]; then
      echo "cluster.sh: processes ${pids[*]} of $ns survive SIGKILL" >&2; exit 1
    fi
    sleep 0.02
  done
}

# Sets the LAN and replication links of host $1 (a letter) up or down ($2), both ends.
set_links() {
  local h=$1 state=$2
  ip link set "${name}${h}l" "$state"
  ip link set "${name}${h}r" "$state"
  ip -n "${name}$h" link set lan0 "$state"
  ip -n "${name}$h" link set rep0 "$state"
}

# Exits unless $1 is the letter of an existing host of this cluster.
check_host() {
  if ! [[ "$1" =~ ^[a-e]$ ]]; then echo "cluster.sh: host must be a letter a..e" >&2; exit 2; fi
  if ! ip netns pids "${name}$1" >/dev/null 2>&1; then
    echo "cluster.sh: no host ${name}$1" >&2; exit 2
  fi
}

down() {
  local h
  for h in "${letters[@]}"; do
    if ip netns pids "${name}$h" >/dev/null 2>&1; then
      kill_procs "${name}$h"
      ip netns del "${name}$h" 2>/dev/null || true
    fi
    ip link del "${name}${h}l" 2>/dev/null || true
    ip link del "${name}${h}r" 2>/dev/null || true
  done
  ip link del "${name}lan" 2>/dev/null || true
  ip link del "${name}rep" 2>/dev/null || true
}

case "$cmd" in
  up)
    index=${3:?missing index}
    hosts=${4:-3}
    check_index "$index" cluster.sh
    if ! [[ "$hosts" =~ ^[1-5]$ ]]; then echo "cluster.sh: hosts must be 1..5" >&2; exit 2; fi
    down
    require_free_subnet "10.77.$index" cluster.sh
    require_free_subnet "10.78.$index" cluster.sh
    for br in lan rep; do
      ip link add "${name}$br" type bridge
      ip link set "${name}$br" type bridge forward_delay 0 stp_state 0
    done
    ip addr add "10.77.$index.1/24" dev "${name}lan"
    ip addr add "10.78.$index.254/24" dev "${name}rep"
    ip link set "${name}lan" up
    ip link set "${name}rep" up
    for ((i = 1; i <= hosts; i++)); do
      h=${letters[i - 1]}
      ns="${name}$h"
      ip netns add "$ns"
      ip link add "${name}${h}l" type veth peer name lan0 netns "$ns"
      ip link add "${name}${h}r" type veth peer name rep0 netns "$ns"
      ip link set "${name}${h}l" master "${name}lan"
      ip link set "${name}${h}r" master "${name}rep"
      ip link set "${name}${h}l" up
      ip link set "${name}${h}r" up
      ip netns exec "$ns" sh -e -c "
        ip link set lo up
        ip link add br0 type bridge
        ip link set br0 type bridge forward_delay 0 stp_state 0
        ip tuntap add dev tap0 mode tap
        ip link set tap0 master br0
        ip link set lan0 master br0
        ip link set tap0 up
        ip link set lan0 up
        ip link set br0 up
        ip addr add 10.78.$index.$i/24 dev rep0
        ip link set rep0 up"
    done
    ;;
  down)
    down
    ;;
  kill)
    h=${3:?missing host letter}
    check_host "$h"
    set_links "$h" down
    kill_procs "${name}$h"
    ;;
  revive)
    h=${3:?missing host letter}
    check_host "$h"
    set_links "$h" up
    ;;
  *)
    echo "$usage" >&2; exit 2;;
esac
