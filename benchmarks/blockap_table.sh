#!/usr/bin/env bash
# Block-wise training on SmolLM2 (H100): every preset at W4A16-g128, W3A16-g128, W2A16-g64, W4A4,
# W6A6, W2A8-g128, each evaluated on the full WikiText-2 test at seqlen 2048. Writes
# $OUT/blockap.jsonl (one `qtool eval --json` line per run) and $OUT/blockap.md.
#
# Budget (~9 minutes on one H100): 18 trainings + 18 full evaluations. The three presets run as
# three concurrent processes (a 135M model leaves the GPU mostly idle), six jobs each, so a job
# gets ~90 s: ~30 s for the full evaluation and ~50 s for 30 blocks of training, i.e. ~1.6 s per
# block. At an estimated 20-25 ms per step (576-wide block, 2048 tokens, bf16 autocast) that is
# 64 steps: SAMPLES=32 x 2048 tokens, EPOCHS=2, batch 1. These are estimates, not measurements:
# override SAMPLES/EPOCHS if the first job's timing (in the JSON) says otherwise.
set -euo pipefail
OUT=${OUT:-runs/blockap}
WORK=${WORK:-runs/blockap-stages}
SAMPLES=${SAMPLES:-32}
EPOCHS=${EPOCHS:-2}
mkdir -p "$OUT" "$WORK"
Q="python3 -m qtool.cli"
SPECS=${SPECS:-"W4A16-g128 W3A16-g128 W2A16-g64 W4A4 W6A6 W2A8-g128"}

run_preset() {
  local preset=$1
  for spec in $SPECS; do
    local stage="$WORK/$preset-${spec//\*/star}"
    $Q train-blockap smollm2-135m -o "$stage" --preset "$preset" --spec "$spec" \
      --samples "$SAMPLES" --seqlen 2048 --epochs "$EPOCHS" --json | tail -1 > "$stage.train.json"
    $Q eval "$stage" --seqlen 2048 --json | tail -1 \
      | python3 -c "import json,sys; r=json.load(sys.stdin); r['spec']='$preset '+r['spec']; print(json.dumps(r))" >> "$OUT/blockap.jsonl"
  done
}

for preset in omniquant efficientqat abq; do
  run_preset "$preset" &
done
wait
python3 benchmarks/ppl_table.py "$OUT/blockap.jsonl" | tee "$OUT/blockap.md"
