#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up (idempotent, cached), then every test of the
# workspace. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Tests run two at a time on two cores: one libtorch thread each avoids OpenMP oversubscription
# (spinning threads make an oversubscribed run many times slower).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cargo test --workspace --all-targets "$@"
