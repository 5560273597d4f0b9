# One venv (.venv), created/updated idempotently: pip at a pinned version, torch==2.13.0 (CPU)
# first, then llama-cpp-python from a portable wheel built once per machine, then the package
# with every extra (and Ray, for the fleet's Ray executor test) under constraints.txt — the lock:
# every package, transitive ones included, at one exact version with its hashes, so two clones
# of one commit install the same set and nothing pulls a CUDA torch. `make lock` regenerates it.
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
# The onnx-web target's JavaScript side (web/: onnxruntime-web, the tokenizer library, puppeteer-core
# for the browser check), installed from its lockfile; Node >= 20 is the only system need.
WEB_STAMP     := web/node_modules/.loradeploy-installed
PIP_VERSION   := 26.3
UV_VERSION    := 0.13.9
EXTRAS        := all,ray,dev
comma         := ,

.PHONY: setup demo test test-fast lock upgrade clean
setup: $(STAMP) $(WEB_STAMP)

$(WEB_STAMP): web/package.json web/package-lock.json
	npm ci --prefix web --no-audit --no-fund --loglevel=error
	touch $(WEB_STAMP)

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
	$(PY) -m pip install --quiet pip==$(PIP_VERSION)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(PY) -m pip install --quiet --require-hashes --no-deps -r constraints.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q --durations=30

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The lock: `uv pip compile` of pyproject.toml's extras with requirements/pins.in. `make lock`
# keeps every pin that still fits (after an edit of pyproject.toml or pins.in); `make upgrade`
# takes the newest versions of everything not pinned by hand. Commit constraints.txt after
# `make test` passes on it.
LOCK_ARGS := pyproject.toml $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra $(e)) -c requirements/pins.in \
             --python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links /opt/wheels \
             --generate-hashes --quiet -o constraints.txt
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv==$(UV_VERSION)
	$(VENV)/bin/uv pip compile $(LOCK_ARGS)
upgrade:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv==$(UV_VERSION)
	$(VENV)/bin/uv pip compile --upgrade $(LOCK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache web/node_modules
