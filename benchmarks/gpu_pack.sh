#!/usr/bin/env bash
# One GPU call for issue 7: kernel tests touched by packing, packed-vs-stage perplexity on SmolLM2
# (WikiText-2 test, all windows; in fp32 and in fp16), then `qtool bench e2e`. Needs QTOOL_SMOLLM2_GGUF (or the cached
# model), PYTHONPATH=src and $OUT. Writes pack_tests.log, ppl.jsonl, e2e_bench.csv/png, e2e.log
# (E2E_TIMEOUT=0: perplexity only).
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
export PYTHONPATH="${PYTHONPATH:-src}"
mkdir -p "$OUT"
nvidia-smi -L
SPECS="${SPECS:-W4A16-g128 W2A16-g64 W4A4 W4A4KV4}"
WINDOWS="${WINDOWS:-}"
# float32: the packed model keeps its fp32 scales and computes the stage's arithmetic (exact);
# float16: the kernels, beside the stage evaluated in fp16 too
DTYPES="${DTYPES:-float32 float16}"

[ -n "${SKIP_TESTS:-}" ] || timeout 120 python3 -m pytest -q -x tests/kernels -k "quantize or u8 or wonly" 2>&1 | tail -5 | tee "$OUT/pack_tests.log"

for spec in $SPECS; do
  python3 -m qtool.cli pack smollm2-135m --spec "$spec" --out "/tmp/packed/$spec" --json 2>/dev/null | tail -1 >> "$OUT/pack.jsonl"
  for dtype in $DTYPES; do
    win="${WINDOWS:+--windows $WINDOWS} --dtype $dtype"
    python3 -m qtool.cli eval smollm2-135m --spec "$spec" $win --batch-size 8 --json 2>/dev/null | tail -1 >> "$OUT/ppl.jsonl"
    python3 -m qtool.cli eval "/tmp/packed/$spec" $win --batch-size 8 --json 2>&1 | tail -1 >> "$OUT/ppl.jsonl"
    python3 - "$OUT/ppl.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
a, b = rows[-2], rows[-1]
print(f"{a['spec']:>12} {a['dtype']:>8}  stage {a['ppl']:.4f}  packed {b['ppl']:.4f}  diff {100 * (b['ppl'] / a['ppl'] - 1):+.3f}%  "
      f"({b['seconds']} s vs {a['seconds']} s, packed linears {b.get('packed_bytes', {}).get('linear_bytes')} B)")
PY
  done
done 2>&1 | tee "$OUT/ppl_summary.txt"

[ "${E2E_TIMEOUT:-300}" = 0 ] && exit 0  # perplexity only
timeout "${E2E_TIMEOUT:-300}" python3 -m qtool.cli bench e2e --out "$OUT" ${E2E_ARGS:-} 2>&1 | tee "$OUT/e2e.log" | grep -v "^{" | tail -20
python3 - "$OUT/e2e_bench.csv" <<'PY'
import csv, sys
for r in csv.DictReader(open(sys.argv[1])):
    print({k: v for k, v in r.items() if v and (k in ("model", "spec", "prefill_ms", "peak_bytes") or "speedup" in k or "bits" in k or k.startswith("decode_tok"))})
PY
