# Two commands for a fresh machine: `make demo` and `make test`.
# Each sets up .venv itself. torch is installed first (CPU build unless one is already present),
# so pip does not pull a multi-GB CUDA build as a dependency of the package.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= demo

.PHONY: venv test demo gpu-check lint docker clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests

# The GPU path in one command (benchmarks/gpu_check.py: one Markdown table, exit 1 if a check fails, at most
# 8 minutes on one GPU). Without CUDA: one line, exit 0; its CPU quick mode runs inside make test.
gpu-check: venv
	@cuda=$$($(PY) -c "import torch; print(int(torch.cuda.is_available()))") || exit 1; \
	if [ "$$cuda" = 1 ]; then \
		$(PY) benchmarks/gpu_check.py; \
	else \
		echo "no CUDA device: gpu-check skipped"; \
	fi

lint: venv
	$(VENV)/bin/hadolint --failure-threshold warning docker/Dockerfile

demo: venv
	$(PY) -m trunet.demo --out $(DEMO_DIR)

docker:
	docker build -f docker/Dockerfile -t trunet:latest .

clean:
	rm -rf $(VENV) $(DEMO_DIR) build dist *.egg-info
