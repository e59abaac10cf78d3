# The two commands: `make bench` (the main job) and `make test` (ruff + the tests).
# Each sets up a virtual environment in the clone on first use (.venv/, ignored by git):
# torch pinned (TORCH=, overridable), then the project with its extras, editable. Set-up
# runs again only when pyproject.toml, TORCH or EXTRAS change (a stamp inside .venv/).
#
#   make bench                        # quick run of benchmarks/compare.py, a few minutes
#   make bench ARGS=--full            # the full run (any compare.py flags go in ARGS)
#   make bench-gpu                    # the GPU job on one CUDA device (compare.py --gpu)
#   make test                         # ruff check . and python -m pytest -q
#   make test PYTEST_ARGS=tests/core  # a part of the tests
#   make test COV=                    # without the coverage report
#   make test XDIST=                  # in one process (default: 2 pytest-xdist workers)
#   make test XDIST="-n 4 --dist loadfile"  # more workers on a bigger machine
#   make test TORCH=torch==2.5.1      # another torch
#   make setup | lint | clean
#   make bench PYTHON=python3.12      # the Python that creates .venv/ (>= 3.10)

PYTHON ?= python3
# torch first and pinned: an unpinned torch would pull multi-GB CUDA builds on Linux.
TORCH ?= torch==2.13.0
EXTRAS ?= torch,jax,examples,bench,dev,hf
VENV ?= .venv
ARGS ?=
PYTEST_ARGS ?=
# After the tests, the branch coverage of sam_core, sam_torch and sam_jax (pyproject.toml's
# [tool.coverage.*]; files fully covered are left out of the table): a report only, no
# threshold, so it never fails the run. `make test COV=` runs without it.
COV ?= --cov --cov-report=term-missing:skip-covered
# Two pytest-xdist workers, each test file kept on one worker (its module and session fixtures,
# such as the distributed runs, are then computed once); each worker runs torch and XLA with
# one thread (tests/conftest.py). The coverage report combines the workers'. `make test XDIST=`
# runs everything in one process.
XDIST ?= -n 2 --dist loadfile

VPY := $(VENV)/bin/python
# The stamp names what was installed: a change of any of these sets up again.
SETUP_KEY := $(shell $(PYTHON) -c "import hashlib, sys; h = hashlib.sha256(open('pyproject.toml', 'rb').read()); h.update(sys.argv[1].encode()); print(h.hexdigest()[:16])" "$(TORCH) [$(EXTRAS)]" 2>/dev/null)
STAMP := $(VENV)/.sam-opt-setup-$(or $(SETUP_KEY),unknown)

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export MPLBACKEND := Agg

.PHONY: setup bench bench-gpu test lint clean help
.DEFAULT_GOAL := help

help:
	@echo "make bench   set up (first time) and run the main job: python benchmarks/compare.py \$$ARGS"
	@echo "             (quick run by default; make bench ARGS=--full for the figures to quote)"
	@echo "make bench-gpu  the GPU job on one CUDA device: python benchmarks/compare.py --gpu"
	@echo "make test    set up (first time) and run ruff check . and python -m pytest -q \$$PYTEST_ARGS,"
	@echo "             with a branch-coverage report of sam_core, sam_torch, sam_jax (COV= for none),"
	@echo "             on 2 pytest-xdist workers (XDIST= for one process)"
	@echo "make setup   only the set-up: $(VENV)/ with $(TORCH) and .[$(EXTRAS)]"
	@echo "make lint    ruff check ."
	@echo "make clean   remove $(VENV)/ and the caches (runs/ is kept)"

setup: $(STAMP)

$(STAMP):
	@$(PYTHON) -c "import sys" 2>/dev/null || { \
	  echo "make: '$(PYTHON)' not found; sam-opt needs Python >= 3.10 (make ... PYTHON=python3.11)" >&2; exit 1; }
	@$(PYTHON) -c "import sys; sys.exit(sys.version_info < (3, 10))" || { \
	  echo "make: sam-opt needs Python >= 3.10, '$(PYTHON)' is $$($(PYTHON) -c 'import platform; print(platform.python_version())'); install a newer one and run e.g. make $(MAKECMDGOALS) PYTHON=python3.11" >&2; exit 1; }
	@if [ ! -x "$(VPY)" ]; then \
	  echo "make: creating $(VENV)/ with $(PYTHON) ($$($(PYTHON) -c 'import platform; print(platform.python_version())'))"; \
	  $(PYTHON) -m venv "$(VENV)" || { echo "make: '$(PYTHON) -m venv' failed; on Debian/Ubuntu install the python3-venv package" >&2; exit 1; }; \
	fi
	@echo "make: installing $(TORCH), then the project with [$(EXTRAS)] into $(VENV)/"
	$(VPY) -m pip install --quiet "$(TORCH)"
	$(VPY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.sam-opt-setup-*
	@touch "$@"
	@$(VPY) -c "import torch, jax; print('make: set up: torch', torch.__version__, '| jax', jax.__version__)" 2>/dev/null || true

bench: $(STAMP)
	$(VPY) benchmarks/compare.py $(ARGS)

bench-gpu: $(STAMP)
	$(VPY) benchmarks/compare.py --gpu $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# pytest exits 5 when it collects no test: a failure here, not a pass.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	@echo "$(VPY) -m pytest -q $(PYTEST_ARGS) $(COV) $(XDIST)"; \
	$(VPY) -m pytest -q $(PYTEST_ARGS) $(COV) $(XDIST); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests: failing" >&2; exit 1; fi; \
	exit $$rc

clean:
	rm -rf "$(VENV)" .pytest_cache .ruff_cache .hypothesis .coverage .coverage.* build dist
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
