#!/usr/bin/env bash
# One GPU call for the kernels branch: tests (no -x: one failure must not hide the rest), SASS counts, benchmark.
# Run from the repo root on the H100 with PYTHONPATH=src and $OUT set. Writes 5 files to $OUT (<= 8 min:
# tests <= 250 s, SASS counts ~30 s, benchmark <= 190 s; the CSV is streamed, so a cut-off run keeps its rows).
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
export PYTHONPATH="${PYTHONPATH:-src}"
export QTOOL_CACHE="/tmp/qtool_cache_$$"   # no tuned table from an earlier run may steer the chooser
mkdir -p "$OUT"
nvidia-smi -L

timeout 250 python3 -m pytest -q tests/kernels 2>&1 | tee "$OUT/kernel_tests.log"

{
  for src in kernels/cuda/*.cu; do
    cubin="/tmp/$(basename "$src" .cu).cubin"
    nvcc -arch=sm_90 -cubin -DQTOOL_INSTANTIATE -o "$cubin" "$src" || { echo "$src: nvcc failed"; continue; }
    if command -v cuobjdump >/dev/null; then
      echo "$src: BMMA=$(cuobjdump -sass "$cubin" | grep -c BMMA) IMMA=$(cuobjdump -sass "$cubin" | grep -c IMMA)" \
           "HMMA=$(cuobjdump -sass "$cubin" | grep -c HMMA) HFMA2=$(cuobjdump -sass "$cubin" | grep -c HFMA2)"
    else
      echo "cuobjdump not on PATH: no SASS counts"
    fi
  done
} 2>&1 | tee "$OUT/sass_counts.txt"

timeout 190 python3 -m qtool.bench kernels \
  --shapes 4096x11008,8192x8192,28672x8192 --m 1,4,16,64,256,1024,4096 \
  --paths fp16,int_mm,w4a16,w2a16,w3a16,w8a16,w2a8,w2a8:bitplane,w2a2,w2a2:bitplane,w4a4 \
  --reps 10 --out "$OUT" --json 2>&1 | tee "$OUT/bench.log"
