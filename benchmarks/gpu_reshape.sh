#!/usr/bin/env bash
# The reshape issue's GPU check, in two device calls (the SmolLM2 GGUF travels in two parts):
#   part 1: carry .gguf/part_aa; copies it to /root and runs the kernel tests (no model needed;
#           `1 copy` only copies).
#   part 2: carry .gguf/part_ab and .whl; joins the GGUF, installs gguf, runs the packed-model and
#           runtime tests on the GPU, packs and evaluates SmolLM2 from a built wheel installed outside
#           the checkout (its kernel sources come from the wheel), and times the chooser's paths.
# Run from the repo root: `bash benchmarks/gpu_reshape.sh 1|2` with $OUT set.
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
REPO=$PWD
export PYTHONPATH=src QTOOL_CACHE="/tmp/qtool_cache_$$"
mkdir -p "$OUT"
nvidia-smi -L
if [ "$1" = 1 ]; then
  cp .gguf/part_aa /root/part_aa
  [ "${2:-}" = copy ] && exit 0
  timeout 420 python3 -m pytest -q -p no:warnings tests/kernels 2>&1 | tee "$OUT/kernel_tests.log" | tail -15
  exit 0
fi
[ -f /root/part_aa ] || { echo "no /root/part_aa: the machine is fresh, run part 1 again first"; exit 3; }
cat /root/part_aa .gguf/part_ab > /root/smollm2.gguf && ls -la /root/smollm2.gguf
python3 -m pip install -q --no-deps .whl/gguf-*.whl 2>&1 | tail -1
export QTOOL_SMOLLM2_GGUF=/root/smollm2.gguf
timeout 300 python3 -m pytest -q -p no:warnings tests/stages/test_pack.py tests/runtime tests/stages/test_eval.py 2>&1 \
  | tee "$OUT/runtime_tests.log" | tail -15
{
  python3 -m pip wheel -q --no-deps --no-build-isolation -w /tmp/wheel . && python3 -m pip install -q --no-deps --target /tmp/site /tmp/wheel/qtool-*.whl
  cd /tmp && export PYTHONPATH=/tmp/site
  python3 -c "import qtool, qtool.kernels.cuda_runtime as r; print('qtool from', qtool.__file__); print('kernels from', r.SOURCE_DIR)"
  python3 -m qtool.cli pack smollm2-135m --spec W4A16-g128 -o /tmp/packed --dtype float16 --json | tail -1
  python3 -m qtool.cli eval /tmp/packed --windows 4 --dtype float16 --device cuda --json | tail -1
  python3 -m qtool.cli eval smollm2-135m --spec W4A16-g128 --windows 4 --dtype float16 --device cuda --json | tail -1
} 2>&1 | tee "$OUT/wheel.log" | tail -8
cd "$REPO" && export PYTHONPATH=src
timeout 150 python3 -m qtool.bench kernels --shapes 4096x11008,8192x8192 --m 1,4,16,64,256 \
  --paths fp16,w4a16,w2a16,w2a8,w4a4,w2a2 --reps 10 --out "$OUT" --json 2>&1 | tee "$OUT/bench.log" | tail -30
