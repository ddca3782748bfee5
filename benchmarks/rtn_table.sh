#!/usr/bin/env bash
# The RTN floor on SmolLM2: WikiText-2 test, seqlen 2048, every window; calibration (for the
# per-tensor static rows) 128 x 2048 tokens of WikiText-2 valid. Writes rtn.jsonl and rtn.md to $OUT.
set -euo pipefail
OUT=${OUT:-runs/rtn}
mkdir -p "$OUT"
Q="python3 -m qtool.cli"
CAL=${CAL:-runs/rtn-calibrate}
$Q calibrate smollm2-135m -o "$CAL" --samples 128 --seqlen 2048 --json | tail -1 > "$OUT/calibrate.json"
: > "$OUT/rtn.jsonl"
for spec in W16A16 W4A16-g128 W3A16-g128 W2A16-g64 W4A16 W3A16 W8A8 W6A6 W4A8 W4A4 W8A8-tensor W6A6-tensor W4A16KV4; do
  $Q eval "$CAL" --spec "$spec" --seqlen 2048 --json "$@" | tail -1 >> "$OUT/rtn.jsonl"
done
python3 benchmarks/ppl_table.py "$OUT/rtn.jsonl" | tee "$OUT/rtn.md"
