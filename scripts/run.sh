#!/usr/bin/env bash
# The main job on its embedded default. Until the training pipeline lands this is the network
# check: the Endo-FM network run on the published code's test vectors (forward on five inputs,
# one self-supervised training step with every gradient), printed as JSON lines; it fails when
# anything is out of tolerance.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -p endofm-worker -p endofm
reference="${ENDOFM_REFERENCE_DIR:-../shared/reference}/endofm-tiny"
./target/release/endofm-worker model info --preset vit_b
exec ./target/release/endofm-worker model verify --reference "$reference" "$@"
