# The two commands a fresh machine needs (both install everything first, idempotently):
#   make demo   convert the embedded digits set and train the reference ViT + drloc on it
#   make test   run the test suite (what CI runs, through .ci/run)
# Also: make gpu-bundle (what a lent GPU machine needs, for bench/gpu_check.sh), make lock (after a change to
# requirements-cpu.txt or requirements-nodeps.txt).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-cpu
LOCK := requirements-cpu.lock
BUNDLE := .gpu-bundle
# build-essential and python3-dev: ffcv and DeepSpeed compile C++ (at install, and DeepSpeed's ops at run time);
# FFCV builds against libturbojpeg and OpenCV. Fashion-MNIST is a second real dataset, for the tests only.
APT_PACKAGES := build-essential python3-dev pkg-config libturbojpeg0-dev libopencv-dev
APT_TEST_PACKAGES := dataset-fashion-mnist
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean lock gpu-bundle test-packages

# $(call apt_install,PACKAGES): install the Debian packages of the list that are missing.
define apt_install
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages: $$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi
endef

setup: $(STAMP)

# The lock pins every package (pip, setuptools and wheel too) and is complete, so it installs with --no-deps:
# nothing unpinned comes in, and ffcv's GUI OpenCV stays out. DS_BUILD_OPS=0 keeps DeepSpeed from compiling its
# CUDA ops at install time.
$(STAMP): $(LOCK) setup.py
	$(call apt_install,$(APT_PACKAGES))
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

test-packages:
	$(call apt_install,$(APT_TEST_PACKAGES))

demo: setup
	$(VENV)/bin/smallvit demo

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: setup test-packages
	@set -o pipefail; $(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: setup
	$(VENV)/bin/smallvit bench all

# Everything the GPU machine lacks for bench/gpu_check.sh, in $(BUNDLE)/ (ignored; carry it on the device call).
gpu-bundle: setup
	$(PY) -m bench.gpu_bundle build --out $(BUNDLE)

# A fresh venv from the top-level requirements, frozen: every package at the version it resolved to.
lock:
	$(call apt_install,$(APT_PACKAGES))
	@set -euo pipefail; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip setuptools wheel; \
	DS_BUILD_OPS=0 "$$tmp/venv/bin/python" -m pip install -q -r requirements-cpu.txt; \
	"$$tmp/venv/bin/python" -m pip install -q --no-deps -r requirements-nodeps.txt; \
	broken=$$("$$tmp/venv/bin/python" -m pip check 2>&1 | grep -v -e "^No broken" \
	  -e "^ffcv .* requires opencv-python, which is not installed" || true); \
	if [ -n "$$broken" ]; then echo "$$broken"; exit 1; fi; \
	{ echo "# Every package of the CPU environment, pinned: made by 'make lock' (a fresh venv from"; \
	  echo "# requirements-cpu.txt, then requirements-nodeps.txt with --no-deps); installed by 'make setup' with"; \
	  echo "# --no-deps. Python $$("$$tmp/venv/bin/python" -c 'import platform; print(platform.python_version())'), x86_64."; \
	  "$$tmp/venv/bin/python" -m pip freeze --all; } > $(LOCK).tmp; \
	mv $(LOCK).tmp $(LOCK); echo "wrote $(LOCK): $$(grep -vc '^#' $(LOCK)) packages"

clean:
	rm -rf runs .pytest_cache
