#!/usr/bin/env bash
# --nproc scaling on the CPU: calibrate and train-blockap on SmolLM2-135M (30 blocks), 16 windows of
# 512 tokens of WikiText-2 valid, one process vs two (gloo). Seconds per block are the manifest's
# timings.blocks_s (the block loop; train-blockap's includes capturing block 0's inputs) / 30;
# work_s adds loading the model and the text. Writes distributed_cpu.jsonl and .md to $OUT.
set -euo pipefail
OUT=${OUT:-runs/distributed-cpu}
mkdir -p "$OUT"
Q="python3 -m qtool.cli"
COMMON=(--samples 16 --seqlen 512 --device cpu)
: > "$OUT/distributed_cpu.jsonl"
for n in 1 2; do
  rm -rf "$OUT/cal$n"
  /usr/bin/time -f "%e" -o "$OUT/wall" $Q calibrate smollm2-135m -o "$OUT/cal$n" "${COMMON[@]}" --nproc "$n" > /dev/null
  python3 - "$OUT/cal$n" calibrate "$n" "$(cat "$OUT/wall")" >> "$OUT/distributed_cpu.jsonl" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/qtool.json"))
print(json.dumps({"stage": sys.argv[2], "nproc": int(sys.argv[3]), "world_size": m["world_size"], "wall_s": float(sys.argv[4]), **m["timings"]}))
PY
done
for n in 1 2; do
  rm -rf "$OUT/bap$n"
  /usr/bin/time -f "%e" -o "$OUT/wall" $Q train-blockap smollm2-135m -o "$OUT/bap$n" --preset omniquant --spec W4A16-g64 \
    --batch-size 4 --epochs 1 "${COMMON[@]}" --nproc "$n" > /dev/null
  python3 - "$OUT/bap$n" train-blockap "$n" "$(cat "$OUT/wall")" >> "$OUT/distributed_cpu.jsonl" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/qtool.json"))
print(json.dumps({"stage": sys.argv[2], "nproc": int(sys.argv[3]), "world_size": m["world_size"], "wall_s": float(sys.argv[4]),
                  "last_block_loss": m["metrics"]["block29.loss"], **m["timings"]}))
PY
done
python3 - "$OUT/distributed_cpu.jsonl" > "$OUT/distributed_cpu.md" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| stage | processes | s per block | block loop s | work s | wall s (CLI, start-up included) |")
print("|---|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['stage']} | {r['nproc']} | {r['blocks_s'] / 30:.2f} | {r['blocks_s']:.1f} | {r['work_s']:.1f} | {r['wall_s']:.1f} |")
PY
cat "$OUT/distributed_cpu.md"
