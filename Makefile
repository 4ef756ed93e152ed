# Set-up and the everyday commands. `make demo` and `make test` are all a fresh
# machine needs (Python 3.10+ and a C compiler).
#
# torch: on a CPU-only machine `pip install torch==2.13.0` takes a CPU wheel;
# an unpinned torch pulls a multi-GB CUDA build. The venv gets TORCH_SPEC only
# when it has no torch yet. GPU users: `make VENV_FLAGS=--system-site-packages`
# to reuse the torch (and onnxruntime-gpu) already installed, or install your
# torch into .venv first.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlmedge-installed

.PHONY: demo test test-all install clean-artifacts bench

$(STAMP): pyproject.toml setup.py runtime/_cpreprocess.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[export,dev]"
	@touch $(STAMP)

install: $(STAMP)

DEMO_ART ?= artifacts/demo-onnx-fp32

# Export the demo model (validated against PyTorch), then answer through the
# lean runtime: the bundled scene image, several questions, timings on stderr.
demo: $(STAMP)
	@test -f $(DEMO_ART)/manifest.json || $(VENV)/bin/vlm-export --model demo --output $(DEMO_ART)
	$(VENV)/bin/vlm-run $(DEMO_ART) \
	  --prompt "describe the image." --prompt "what color is the diamond?" \
	  --prompt "how many shapes are there?" --prompt "where is the green diamond?" \
	  --prompt "is there a blue circle?"

DEMO_INT8 ?= artifacts/demo-onnx-int8
BENCH_DIR ?= bench
BENCH_FLAGS ?= --runs 5 --warmup 1

# Latency of the demo model, fp32 and int8 artifacts side by side with PyTorch
# eager (one run, interleaved): $(BENCH_DIR)/demo.json, $(BENCH_DIR)/report/
# (report.md + plots), the summary table on stdout. Without an int8 artifact
# (its export failed) it benchmarks fp32 alone and says so.
bench: $(STAMP)
	@test -f $(DEMO_ART)/manifest.json || $(VENV)/bin/vlm-export --model demo --output $(DEMO_ART)
	@arts="$(DEMO_ART)"; \
	if test -f $(DEMO_INT8)/manifest.json || \
	   $(VENV)/bin/vlm-export --model demo --precision int8 --output $(DEMO_INT8); then \
	  arts="$$arts $(DEMO_INT8)"; \
	else \
	  echo "make bench: note: no int8 artifact (vlm-export --precision int8 failed above); benchmarking fp32 only" >&2; \
	fi; \
	$(VENV)/bin/vlm-bench $$arts --baseline torch $(BENCH_FLAGS) \
	  --json $(BENCH_DIR)/demo.json --report $(BENCH_DIR)/report

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"
