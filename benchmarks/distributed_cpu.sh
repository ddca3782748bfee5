#!/usr/bin/env bash
# --nproc scaling on the CPU: calibrate and train-blockap on SmolLM2-135M (30 blocks), 16 windows of
# 512 tokens of WikiText-2 valid, one process vs two (gloo). Seconds per block are the manifest's
# timings.blocks_s (the block loop; train-blockap's includes capturing block 0's inputs) / 30;
# work_s adds loading the model and the text; peak RSS is GNU time's %M (the largest process: a rank,
# or the one process). Run it on an otherwise idle machine. Writes distributed_cpu.jsonl and .md to $OUT.
set -euo pipefail
OUT=${OUT:-runs/distributed-cpu}
mkdir -p "$OUT"
Q="python3 -m qtool.cli"
COMMON=(--samples 16 --seqlen 512 --device cpu)
: > "$OUT/distributed_cpu.jsonl"
# n = 1: one process (all cores), 2: two ranks (the cores shared out), 1t: one process on one core
threads() { if [ "$1" = 1t ]; then echo "env OMP_NUM_THREADS=1"; else echo "env"; fi; }
for n in 1 2 1t; do
  rm -rf "$OUT/cal$n"
  /usr/bin/time -f "%e %M" -o "$OUT/wall" $(threads "$n") $Q calibrate smollm2-135m -o "$OUT/cal$n" "${COMMON[@]}" --nproc "${n%t}" > /dev/null
  python3 - "$OUT/cal$n" calibrate "$n" "$(cat "$OUT/wall")" >> "$OUT/distributed_cpu.jsonl" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/qtool.json"))
wall, rss = sys.argv[4].split()
print(json.dumps({"stage": sys.argv[2], "nproc": sys.argv[3], "world_size": m["world_size"], "wall_s": float(wall),
                  "peak_rss_mib": round(int(rss) / 1024), **m["timings"]}))
PY
done
for n in 1 2 1t; do
  rm -rf "$OUT/bap$n"
  /usr/bin/time -f "%e %M" -o "$OUT/wall" $(threads "$n") $Q train-blockap smollm2-135m -o "$OUT/bap$n" --preset omniquant --spec W4A16-g64 \
    --batch-size 4 --epochs 1 "${COMMON[@]}" --nproc "${n%t}" > /dev/null
  python3 - "$OUT/bap$n" train-blockap "$n" "$(cat "$OUT/wall")" >> "$OUT/distributed_cpu.jsonl" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/qtool.json"))
wall, rss = sys.argv[4].split()
print(json.dumps({"stage": sys.argv[2], "nproc": sys.argv[3], "world_size": m["world_size"], "wall_s": float(wall),
                  "peak_rss_mib": round(int(rss) / 1024), "last_block_loss": m["metrics"]["block29.loss"], **m["timings"]}))
PY
done
python3 - "$OUT/distributed_cpu.jsonl" > "$OUT/distributed_cpu.md" <<'PY'
import json, sys
import os
rows = [json.loads(line) for line in open(sys.argv[1])]
cores = os.cpu_count()
label = {"1": f"1 ({cores} threads)", "2": f"2 ranks ({cores // 2} thread(s) each)", "1t": "1 (1 thread)"}
print("| stage | processes | s per block | block loop s | work s | wall s (CLI, start-up included) | peak RSS of the largest process |")
print("|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['stage']} | {label[r['nproc']]} | {r['blocks_s'] / 30:.2f} | {r['blocks_s']:.1f} | {r['work_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_mib']} MiB |")
PY
cat "$OUT/distributed_cpu.md"
