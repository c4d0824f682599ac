# The two commands a fresh machine needs (both install everything first, idempotently):
#   make demo   convert the embedded digits set and train the reference ViT + drloc on it
#   make test   run the test suite (what CI runs, through .ci/run)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-cpu
APT_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup: $(STAMP)

# apt packages: FFCV builds against libturbojpeg and OpenCV; Fashion-MNIST is a second real dataset for tests.
# torch is pinned by requirements-cpu.txt (an unpinned torch would download GBs); DS_BUILD_OPS=0 keeps DeepSpeed
# from compiling CUDA ops at install time.
$(STAMP): requirements-cpu.txt setup.py
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages: $$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements-cpu.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(VENV)/bin/smallvit demo

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: setup
	@set -o pipefail; $(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: setup
	$(VENV)/bin/smallvit bench all

clean:
	rm -rf runs .pytest_cache
