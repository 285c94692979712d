# Shared by scripts/demo.sh and scripts/test.sh: host packages, toolchain checks, guest build.
# Source it; it defines functions only.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST_ELF="$ROOT/guest/target/x86_64-unknown-linux-gnu/release/vmatrix-guest"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# Installs the Debian packages the project needs, only if something is missing.
ensure_packages() {
  local missing=()
  command -v ip >/dev/null || missing+=(iproute2)
  command -v setpriv >/dev/null || missing+=(util-linux)
  command -v cc >/dev/null || missing+=(gcc)
  command -v python3 >/dev/null || missing+=(python3)
  # nft: also the load balancer of `vmatrix lb` (this kernel has no IPVS, so no ipvsadm).
  command -v nft >/dev/null || missing+=(nftables)
  command -v tcpdump >/dev/null || missing+=(tcpdump)
  command -v chromium >/dev/null || missing+=(chromium) # the chaos report's headless-browser test
  if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${missing[@]}"
  fi
  if ! command -v cargo >/dev/null; then
    echo "cargo not found: this project needs a Rust toolchain (rustup) on the machine" >&2
    exit 1
  fi
  if [ ! -e /dev/kvm ]; then
    echo "/dev/kvm is missing: vmatrix needs KVM (nested virtualization on)" >&2
    exit 1
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "run as root: the demo and tests create network namespaces and tap devices" >&2
    exit 1
  fi
}

build_guest() {
  step "building the test guest (no_std unikernel)"
  (cd "$ROOT/guest" && cargo build --release --locked 2>&1 | tail -n 3)
  ls -l "$GUEST_ELF"
}
