#!/usr/bin/env bash
# README's second command: the whole test suite on real KVM, taps and network namespaces.
# Lints first (rustfmt, clippy with warnings as errors), then every test of the workspace,
# then a short chaos sweep (vmatrix chaos run) and a short fuzzing run of the protocol decoders.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_packages
build_guest
step "rustfmt and clippy"
cargo fmt --all -- --check
(cd guest && cargo fmt -- --check && cargo clippy --locked --release -- -D warnings)
cargo clippy --locked --workspace --all-targets -- -D warnings
step "tests (unit, device models, protocol simulation, QUIC, KVM integration)"
cargo test --locked --workspace
step "chaos sweep (3 seeds x 40 s of faults on a real cluster; fails if the checker does)"
target/debug/vmatrix chaos run --seed 1 --runs 3 --duration 40s --out build/chaos-ci
step "fuzzing (short run from the committed corpus)"
FUZZ_SECONDS=${FUZZ_SECONDS:-30} bash "$ROOT/scripts/fuzz.sh"
