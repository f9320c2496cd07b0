# make run   : create .venv if missing, install ray_cifar, run the default study
#              (the --smoke-test study when this machine has no GPU; it says so).
# make test  : the same set-up (both install the test, tracking and search extras), then the test suite (what CI runs).
# Variables: DATA=<CIFAR-10 folder> (default $RAY_CIFAR_DATA, else ../shared/data/cifar10 when present),
#            ARGS="--set train.epochs=5 ..." passed to the study, PYTHON=<interpreter for the venv>.
# make gpu-check STAGE=core|ray|dali|ray_dali [DRY_RUN=1] [RESULTS=DIR] [PY=python3] [DATA=DIR] [CAP=seconds]
#              : one stage of the GPU check (benchmarks/gpu_check.py; core <= 5 min, ray <= 4, dali <= 3 on one
#              H100/H200; ray_dali <= 2, where a lend has time left), results in RESULTS/gpu_<stage>.json (default benchmarks/results). DRY_RUN=1: every part
#              CPU-sized, no GPU needed. It installs nothing: PY is .venv/bin/python when present, else python3.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= $(or $(RAY_CIFAR_DATA),$(wildcard ../shared/data/cifar10))
DATA_ARG := $(if $(DATA),--data $(DATA))
ARGS   ?=

.PHONY: run test install clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the requirements change. uv installs the ~7 GB of wheels (torch with its CUDA libraries,
# Ray, DALI) in ~1 min from an empty cache where pip takes ~2.5 (2 cores, measured); pip does it where uv cannot
# be had or fails (uv reads UV_DEFAULT_INDEX, not pip's configuration, for a private index).
EXTRAS := -r requirements.txt -e '.[test,tracking,search]'
$(VENV)/.installed: setup.py requirements.txt | $(PY)
	@echo "make install: the pinned requirements and ray_cifar into $(VENV), with uv (~1 min)"
	@if $(PY) -m pip install --quiet uv==0.13.9 && $(PY) -m uv pip install --python $(PY) --quiet --compile-bytecode $(EXTRAS); then :; \
	else echo "make install: installing with pip instead of uv (slower)"; \
		$(PY) -m pip install --quiet --upgrade pip && $(PY) -m pip install --quiet $(EXTRAS); fi
	touch $@

install: $(VENV)/.installed

run: install
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(PY) -m ray_cifar.tune $(DATA_ARG) $(ARGS); \
	else \
		echo "make run: no GPU on this machine: running the --smoke-test study (tiny ResNet, a few thousand images)"; \
		$(PY) -m ray_cifar.tune --smoke-test $(DATA_ARG) $(ARGS); \
	fi

# Two workers, whole files each (module fixtures stay in one process): the integration tests spend most of
# their time waiting on Ray and process starts, so two at a time on 2 cores cut the suite's wall time. Files go
# out longest first, the order tests/conftest.py gives them (--no-loadscope-reorder: xdist's own puts them last).
# Tests send Ray no usage statistics (CI machines have no internet; the driver's start skips their census too).
TEST_WORKERS ?= 2
test: install
	RAY_USAGE_STATS_ENABLED=0 RAY_CIFAR_DATA=$(DATA) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# Not `install`: the GPU machine has no network. PY given on the command line wins, else the venv, else python3.
STAGE   ?= core
RESULTS ?= benchmarks/results
CHECK_PY := $(if $(filter command line environment,$(origin PY)),$(PY),$(if $(wildcard $(PY)),$(PY),python3))
gpu-check:
	$(CHECK_PY) benchmarks/gpu_check.py $(STAGE) --results $(RESULTS) $(DATA_ARG) \
		$(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(if $(CAP),--cap $(CAP))

# clean: the venv and the build's files only; results/ (every study's default --output) is the user's to delete.
clean:
	rm -rf $(VENV) *.egg-info
