#!/usr/bin/env bash
# RPTQ on SmolLM2 beside the same bit widths without reorder (per-tensor static, per-token dynamic):
# WikiText-2 test, seqlen 2048, every window; calibration 128 x 2048 tokens of WikiText-2 valid.
# 23 evaluations of ~18 s on an H100. Writes rptq.jsonl and rptq.md to $OUT. CPU check:
#   SAMPLES=32 SEQLEN=256 bash benchmarks/rptq_table.sh --windows 8 --device cpu
set -euo pipefail
OUT=${OUT:-runs/rptq}
SAMPLES=${SAMPLES:-128}
SEQLEN=${SEQLEN:-2048}
mkdir -p "$OUT"
Q="python3 -m qtool.cli"
CAL=${CAL:-runs/rptq-calibrate}
RO=${RO:-runs/rptq-reorder}
$Q calibrate smollm2-135m -o "$CAL" --samples "$SAMPLES" --seqlen "$SEQLEN" --json | tail -1 > "$OUT/calibrate.json"
$Q reorder "$CAL" -o "$RO" --clusters 32 --head-clusters 4 --json | tail -1 > "$OUT/reorder.json"
: > "$OUT/rptq.jsonl"
ev() { $Q eval "$1" --spec "$2" --seqlen "$SEQLEN" --json "${@:3}" | tail -1 >> "$OUT/rptq.jsonl"; }
ev "$CAL" W16A16 "$@"
ev "$CAL" W4A16 "$@"
for spec in W4A8 W4A4 W4A4KV4 W4A3KV3 W3A3KV3; do
  ev "$RO" "$spec-cluster" "$@"
  ev "$CAL" "$spec-tensor" "$@"
  ev "$CAL" "$spec" "$@"
done
for spec in W4A16KV4 W4A16KV3 W3A16KV3; do
  ev "$RO" "$spec-cluster" "$@"
  ev "$CAL" "$spec" "$@"
done
python3 benchmarks/ppl_table.py "$OUT/rptq.jsonl" | tee "$OUT/rptq.md"
