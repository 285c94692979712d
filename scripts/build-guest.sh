#!/usr/bin/env bash
# Builds the test guest ELF (guest/target/x86_64-unknown-linux-gnu/release/vmatrix-guest).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
build_guest
