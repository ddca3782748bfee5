#!/usr/bin/env bash
# Batched decode and prefill with the wgmma path in the default rule, in one device call: the packed
# runtime's GPU tests, then `qtool bench e2e` on the LLaMA-2-7B shape (32 blocks, random weights) at
# batch 1, 16, 32, 64 and prefill 2048, beside fp16 in the same run. Run from the repo root with $OUT set.
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
export PYTHONPATH=src QTOOL_CACHE="/tmp/qtool_cache_$$"
mkdir -p "$OUT"
nvidia-smi -L
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:warnings ${TESTS:-tests/runtime/test_packed_linear.py tests/runtime/test_decoder.py} \
  2>&1 | tee "$OUT/runtime_tests.log" | tail -4
timeout "${E2E_TIMEOUT:-400}" python3 -m qtool.bench e2e --models llama2-7b --layers llama2-7b=32 \
  --specs "${SPECS:-W4A16-g128,W2A16-g64}" --batches "${BATCHES:-1,16,32,64}" --reps 10 --out "$OUT" --json 2>&1 \
  | tee "$OUT/e2e.log" | grep -v "^{\|^\[" | tail -25
