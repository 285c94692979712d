#!/usr/bin/env bash
# Short fuzzing run of the decoders of untrusted bytes (cargo-fuzz, libFuzzer): the replication
# protocol's frame decoder and receiver state machine (protocol/fuzz), the agent protocol's
# frames and the manager's state file (failover/fuzz), each from its committed seed corpus. New
# corpus entries go to a scratch directory, so the repository's corpus stays as committed.
#   FUZZ_SECONDS=30 scripts/fuzz.sh      (seconds per target; default 30)
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 enables them on the stable toolchain.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
secs=${FUZZ_SECONDS:-30}
if ! command -v cargo-fuzz >/dev/null; then
  step "installing cargo-fuzz"
  cargo install cargo-fuzz --locked 2>&1 | tail -n 2
fi
for spec in protocol:frame protocol:receiver failover:wire failover:state; do
  crate=${spec%%:*}; target=${spec#*:}
  cd "$ROOT/$crate"
  step "fuzzing $crate/$target for ${secs}s"
  scratch=$(mktemp -d)
  log="$scratch.log"
  status=0
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "$scratch" "fuzz/corpus/$target" -- \
    -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E "^(Done|stat::number_of_executed_units)|panicked|SUMMARY|ERROR" "$log" || true
  [ "$status" = 0 ] || tail -n 40 "$log"
  rm -rf "$scratch" "$log"
  if [ "$status" != 0 ]; then
    echo "fuzz target $target failed (crash input in $crate/fuzz/artifacts/$target)" >&2
    exit 1
  fi
done
