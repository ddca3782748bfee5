#!/usr/bin/env bash
# The wgmma GEMM on the GPU in one call: its correctness tests, its SASS (HGMMA present, no local
# memory), and its times beside torch fp16 and dequantize + cuBLAS. `1 copy` first copies .gguf/part_aa
# to /root for gpu_reshape.sh part 2. Run from the repo root with $OUT set: bash benchmarks/gpu_wgmma.sh [copy]
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
export PYTHONPATH=src QTOOL_CACHE="/tmp/qtool_cache_$$"
mkdir -p "$OUT"
nvidia-smi -L
[ "${1:-}" = copy ] && cp .gguf/part_aa /root/part_aa
timeout 300 python3 -m pytest -q -x -p no:warnings tests/kernels/test_gpu_kernels.py -k "wgmma" 2>&1 | tee "$OUT/wgmma_tests.log" | tail -12
nvcc -gencode=arch=compute_90a,code=sm_90a -cubin -DQTOOL_INSTANTIATE -o /tmp/w.cubin kernels/cuda/wonly_gemv.cu \
  && cuobjdump -sass /tmp/w.cubin > "$OUT/wonly.sass" \
  && awk '/Function :/{f=$3} /HGMMA/{h[f]++} /LDL|STL/{l[f]++} END{for (k in h) print "HGMMA", h[k], "LDL/STL", l[k]+0, k}' "$OUT/wonly.sass" | grep wgmma
timeout 240 python3 -m qtool.bench kernels --shapes "${SHAPES:-4096x11008,8192x8192}" --m "${MS:-16,32,64,128,256,1024,4096}" \
  --paths "${PATHS_:-fp16,bf16,tinygemm,fp8,w4a16:wgmma,w4a16:dequant,w2a16:wgmma}" --reps 10 --out "$OUT" --json 2>&1 | tee "$OUT/bench.log" | grep -v "^{" | tail -40
