# One venv (.venv), created/updated idempotently: torch==2.13.0 (CPU) is installed first, then
# llama-cpp-python from a portable wheel built once per machine, then the package with every
# extra (and Ray, for the fleet's Ray executor test) under constraints.txt, so nothing pulls a CUDA torch.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.loradeploy-installed

# llama.cpp is compiled for a portable x86-64 level (AVX2/FMA/F16C, no AVX-512/AMX): a native
# build uses AMX tile instructions where the CPU has them, and VMs that do not enable AMX state
# for processes kill those with a protection fault. Built once (~10 min on 2 cores) into a
# per-machine wheel folder that later set-ups reuse.
LLAMA_VERSION := 0.3.36
WHEELS        ?= $(HOME)/.cache/loradeploy/wheels
LLAMA_CMAKE   := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
                 -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
LLAMA_STAMP   := $(WHEELS)/.llama-cpp-python-$(LLAMA_VERSION)-portable

.PHONY: setup demo test test-fast clean
setup: $(STAMP)

$(LLAMA_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -rf $(WHEELS)/build-$(LLAMA_VERSION) && mkdir -p $(WHEELS)
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip wheel --quiet --no-deps --no-cache-dir \
		-w $(WHEELS)/build-$(LLAMA_VERSION) llama-cpp-python==$(LLAMA_VERSION)
	mv $(WHEELS)/build-$(LLAMA_VERSION)/llama_cpp_python-$(LLAMA_VERSION)-*.whl $(WHEELS)/
	rm -rf $(WHEELS)/build-$(LLAMA_VERSION)
	touch $(LLAMA_STAMP)

$(STAMP): pyproject.toml constraints.txt $(LLAMA_STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(PY) -m pip install --quiet -c constraints.txt -e ".[all,ray,dev]"
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q --durations=30

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
