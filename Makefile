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

.PHONY: demo test test-all install clean-artifacts

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

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"
