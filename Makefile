# make run   : create .venv if missing, install ray_cifar, run the default study
#              (the --smoke-test study when this machine has no GPU; it says so).
# make test  : the same set-up plus the test and tracking extras, then the test suite (what CI runs).
# Variables: DATA=<CIFAR-10 folder> (default $RAY_CIFAR_DATA, else ../shared/data/cifar10 when present),
#            ARGS="--set train.epochs=5 ..." passed to the study, PYTHON=<interpreter for the venv>.
# make gpu-bench : the GPU suite (benchmarks/gpu_suite.sh: CUDA tests, data pipeline, training throughput
#              with MFU, DDP scaling, a short ResNet-18 study); under 20 min on one H100; needs DATA.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= $(or $(RAY_CIFAR_DATA),$(wildcard ../shared/data/cifar10))
DATA_ARG := $(if $(DATA),--data $(DATA))
ARGS   ?=

.PHONY: run test install clean gpu-bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install only when the requirements change.
$(VENV)/.installed: setup.py requirements.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt -e '.[test,tracking]'
	touch $@

install: $(VENV)/.installed

run: install
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(PY) -m ray_cifar.tune $(DATA_ARG) $(ARGS); \
	else \
		echo "make run: no GPU on this machine: running the --smoke-test study (tiny ResNet, a few thousand images)"; \
		$(PY) -m ray_cifar.tune --smoke-test $(DATA_ARG) $(ARGS); \
	fi

test: install
	RAY_CIFAR_DATA=$(DATA) $(PY) -m pytest tests

gpu-bench: install
	benchmarks/gpu_suite.sh "$(DATA)" $(PY)

clean:
	rm -rf $(VENV) results *.egg-info
