# Shared by scripts/netns.sh and scripts/hosts.sh (source it; it defines functions only).

# Exits unless $1 is a test-network index 1..250. $2 names the caller in the message.
check_index() {
  if ! [[ "$1" =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ] || [ "$1" -gt 250 ]; then
    echo "$2: index must be 1..250" >&2; exit 2
  fi
}

# Exits if an interface of this namespace already holds an address in subnet $1 (e.g.
# 10.77.5): its routes would capture the guest's traffic. $2 names the caller.
require_free_subnet() {
  local holder pattern
  pattern=" ${1//./\\.}\\.[0-9]+/"
  holder=$(ip -o -4 addr show | grep -E "$pattern" | awk '{print $2}' | head -n1 || true)
  if [ -n "$holder" ]; then
    echo "$2: subnet $1.0/24 is already used by interface $holder" >&2; exit 3
  fi
}
