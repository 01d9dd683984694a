#!/usr/bin/env bash
# The main job on its embedded default: set-up, a release build, the network check against the
# published code's test vectors, then a pre-training run of the tiny preset on a generated
# endoscopy-like corpus (MP4 clips made by `endofm-worker synth`, cached under .cache/), with
# checkpoints, metrics.jsonl and config.json in a fresh .cache/runs/<time>/ folder.
# Extra arguments go to `endofm-worker pretrain` (e.g. --epochs 10, --data s3://bucket/corpus).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -p endofm-worker -p endofm
worker=./target/release/endofm-worker

reference="${ENDOFM_REFERENCE_DIR:-../shared/reference}/endofm-tiny"
if [ -d "$reference" ]; then
  "$worker" model verify --reference "$reference" --log-format text
fi

corpus=.cache/demo-corpus
if [ ! -f "$corpus/train.csv" ]; then
  "$worker" synth --kind pretrain --out "$corpus" --clips 24 --frames 150 --size 256 --seed 0
fi
out=".cache/runs/$(date +%Y%m%d-%H%M%S)"
exec "$worker" pretrain --data "$corpus" --out "$out" --preset tiny \
  --epochs 2 --batch 4 --checkpoint-every 6 --threads 2 "$@"
