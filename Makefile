# danet-orchestrator: `make demo` runs the main job, `make test` runs the tests.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# DeepSpeed compiles a small comm extension on first init; cache it inside the project so
# tests, demo and CI pay that once.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR := cpu
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test test-fast triton-check lint slurm-up slurm-down bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev,bench]'
	@mkdir -p $(TORCH_EXTENSIONS_DIR)
	@touch $@

demo: setup
	$(VENV)/bin/orchestrator launch

# The Slurm tests need a local 4-node cluster: scripts/slurm-up.sh installs Debian's packages
# (when missing) and starts it; it is stopped whatever pytest returns. The browser tests need Debian's
# chromium: scripts/chromium-up.sh installs it when missing.
test: setup
	@bash scripts/slurm-up.sh || echo "slurm: local cluster unavailable; slurm tests will skip with the reason"
	@bash scripts/chromium-up.sh >/dev/null || echo "chromium: unavailable; browser tests will skip with the reason"
	@set +e; $(PY) -m pytest -q --durations=15 tests; rc=$$?; bash scripts/slurm-down.sh >/dev/null 2>&1; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected: failing"; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm" tests

# The GPU kernels (models/_lif_triton.py, _bn_neuron_triton.py, _da_triton.py) without a GPU: Triton's interpreter
# runs them on CPU tensors against the torch paths, then each launch is compiled for sm_90 (H100 / H200). Triton
# goes into a folder of its own (~1 GB), not the venv: the CPU stack does not need it, and every import of
# DeepSpeed would load it. tests/test_models.py runs the same two checks when that folder exists.
TRITON_SITE := .cache/triton_site
triton-check: setup
	@test -d $(TRITON_SITE)/triton || $(PIP) install --quiet --no-deps --target $(TRITON_SITE) triton==3.9.0
	TRITON_INTERPRET=1 PYTHONPATH=$(TRITON_SITE) $(PY) tools/lif_triton_check.py
	PYTHONPATH=$(TRITON_SITE) $(PY) tools/triton_compile_check.py

lint: setup
	$(VENV)/bin/ruff check orchestrator models launch tests

slurm-up:
	bash scripts/slurm-up.sh

slurm-down:
	bash scripts/slurm-down.sh

clean:
	rm -rf runs mlruns mlflow.db .cache/data
