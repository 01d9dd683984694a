#!/usr/bin/env bash
# The main job on its embedded default: set-up, a release build, the network check against the
# published code's test vectors, then a local cluster (`endofm up`: the coordinator and two CPU
# worker agents on this machine) pre-training the tiny preset on a generated endoscopy-like
# corpus (cached under .cache/up/), with checkpoints, metrics.jsonl and config.json in
# .cache/up/<time>/out. Extra arguments go to `endofm up` (e.g. --workers 3, --epochs 4,
# --data s3://bucket/corpus).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -p endofm-worker -p endofm
bin=./target/release

reference="${ENDOFM_REFERENCE_DIR:-../shared/reference}/endofm-tiny"
if [ -d "$reference" ]; then
  "$bin/endofm-worker" model verify --reference "$reference" --log-format text
fi

exec "$bin/endofm" up --workers 2 --dir .cache/up --epochs 2 --batch 2 --checkpoint-every 4 "$@"
