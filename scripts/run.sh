#!/usr/bin/env bash
# The main job on its embedded default: set-up, a release build, the network checks against the
# published code's test vectors (the pre-training network and step, the fine-tuning classifier),
# then a local cluster (`endofm up --pipeline`: the coordinator and two CPU worker agents on this
# machine) running three dependent jobs: pre-training of the tiny preset on a generated
# endoscopy-like corpus, fine-tuning (classify) from its teacher on a generated PolypDiag-layout
# dataset with clearly visible polyps, and the evaluation of the chosen model on the held-out
# test split. Data are cached under .cache/up/; every run writes .cache/up/<time>/ (out/,
# finetune/ with report.json and plots/, evaluate/, logs/). Extra arguments go to `endofm up`
# (e.g. --workers 3, --epochs 4, --data s3://bucket/corpus, --ft-epochs 10).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -p endofm-worker -p endofm
bin=./target/release

references="${ENDOFM_REFERENCE_DIR:-../shared/reference}"
for name in endofm-tiny endofm-tiny-classify; do
  if [ -d "$references/$name" ]; then
    "$bin/endofm-worker" model verify --reference "$references/$name" --log-format text
  fi
done

# The fine-tuning data: 200 videos (120 train / 40 val / 40 test, no source video shared),
# positives showing a pale polyp of at least 4 % of the frame in every frame.
ft_data=.cache/up/polypdiag-clear-s31
if [ ! -f "$ft_data/labels.json" ]; then
  "$bin/endofm-worker" synth --kind polypdiag --out "$ft_data" --videos 200 --seed 31 \
    --size 96 --frames 40 --max-frames 56 --polyp-scale 4 --polyp-contrast 3 \
    --min-polyp-share 1 --min-polyp-area 0.04 --log-format text >/dev/null
fi

exec "$bin/endofm" up --workers 2 --dir .cache/up --epochs 2 --batch 2 --checkpoint-every 4 \
  --pipeline --ft-data "$ft_data" --ft-config scripts/finetune-demo.json "$@"
