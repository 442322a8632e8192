# `make install` prepares .venv from requirements.lock (idempotent); `make test` installs if needed,
# then runs the suite; `make lock` upgrades the lock.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
PIP_VERSION := 26.3
LOCK := requirements.lock
LOCK_VENV := .lock-venv
PIP_TOOLS := pip-tools==7.7.0

.PHONY: install lock upgrade browser test serve bench reliability flash-attn clean

install: $(VENV)/.installed browser

# Debian's chromium and its driver for the playground's browser test (tests/test_playground.py)
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    echo "wanserve: installing chromium and chromium-driver with apt-get"; \
	    $$SUDO apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else \
	    echo "wanserve: apt-get is not available here: install chromium and chromedriver as"; \
	    echo "  /usr/bin/chromium and /usr/bin/chromedriver, or tests/test_playground.py fails"; \
	  fi; \
	fi

# requirements.lock pins every dependency but torch (and triton, which comes with a torch
# build): `make install` takes exactly what the suite last passed on. A machine whose python3
# already has torch (a GPU box with its CUDA build) keeps it: the venv then sees the system
# site-packages, and what the system already has is left alone (tools/lock.py
# system-constraints). Elsewhere torch==$(TORCH_VERSION) (CPU) is installed first, so no
# dependency can float it to a CUDA build.
$(VENV)/.installed: pyproject.toml $(LOCK)
	@if [ ! -x $(VPY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "wanserve: using the system torch ($$($(PYTHON) -c 'import torch; print(torch.__version__)'))"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	$(VPY) -m pip install -q pip==$(PIP_VERSION)
	@if grep -q "^include-system-site-packages = true" $(VENV)/pyvenv.cfg; then \
	  $(PYTHON) tools/lock.py system-constraints $(LOCK) > $(VENV)/constraints.txt; \
	else \
	  cp $(LOCK) $(VENV)/constraints.txt; \
	  $(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==$(TORCH_VERSION) -c $(VENV)/constraints.txt; \
	fi
	$(VPY) -m pip install -q -c $(VENV)/constraints.txt -e ".[test,bench]"
	$(VPY) -m pip check
	@touch $@

# `make lock` regenerates requirements.lock from pyproject.toml, keeping every pin that still
# fits (a new dependency gets the newest version its range allows); `make upgrade` moves every
# pin to the newest allowed. Either one, then `make test` (README, "Installing and upgrading").
# pip-compile runs from a venv of its own, with torch held at the CPU build the suite runs on;
# tools/lock.py then drops torch and triton from the lock.
upgrade: LOCK_FLAGS = --upgrade
upgrade: lock
lock:
	@[ -x $(LOCK_VENV)/bin/pip-compile ] || { $(PYTHON) -m venv $(LOCK_VENV) && \
	  $(LOCK_VENV)/bin/pip install -q pip==$(PIP_VERSION) $(PIP_TOOLS); }
	@echo "torch==$(TORCH_VERSION)" > $(LOCK_VENV)/torch.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet $(LOCK_FLAGS) --strip-extras --extra test --extra bench \
	  --no-emit-index-url --no-emit-find-links --constraint $(LOCK_VENV)/torch.txt \
	  --output-file $(LOCK) pyproject.toml
	$(PYTHON) tools/lock.py strip $(LOCK)
	$(LOCK_VENV)/bin/python tools/lock.py check $(LOCK)

# Two pytest workers, a test file each at a time (module fixtures stay in one worker): most of
# the suite waits on servers, restarts and timeouts, so two files at once fill the two cores.
# Files go in the suite's own order (tests/conftest.py: the longest first), not xdist's (the
# most tests first).
TEST_WORKERS ?= 2
test: install
	$(VPY) -m pip check
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

serve: install
	./launch.sh

bench: install
	$(VPY) benchmarks/serving_overhead.py
	$(VPY) benchmarks/parallel_efficiency.py

reliability: install
	$(VPY) -m pytest -q tests/test_hardening.py tests/test_malformed.py tests/test_params.py tests/test_openapi_fuzz.py \
	  tests/test_jobs_lifecycle.py tests/test_restarts.py tests/test_disk_bounds.py tests/test_storm.py \
	  tests/test_multirank_server.py::test_killed_rank_answers_the_caller_and_stops_the_server_with_the_reason \
	  "tests/test_http_e2e.py::test_invalid_values_name_the_param" \
	  "tests/test_http_e2e.py::test_missing_image_unsupported_types_and_oversize" tests/test_images_video.py
	$(VPY) benchmarks/load_test.py --clients 32 --requests-per-client 3

# Optional, GPU boxes only (docs/gpu.md): flash-attn 2 for the torch already in .venv. Its
# setup fetches a wheel made for that torch or compiles one (FLASH_ATTENTION_FORCE_BUILD=TRUE
# always compiles); a wheel made for another torch fails xfuser's import check, unused.
flash-attn: install
	@$(VPY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'flash-attn needs a CUDA build of torch')"
	$(VPY) -m pip install packaging ninja
	MAX_JOBS=$${MAX_JOBS:-4} $(VPY) -m pip install flash-attn --no-build-isolation
	$(VPY) -c "from xfuser.envs import PACKAGES_CHECKER as p; print('xfuser sees flash-attn 2:', p.get_packages_info()['has_flash_attn'])"

clean:
	rm -rf $(VENV) $(LOCK_VENV) *.egg-info
