# Two commands for a fresh machine: `make demo` and `make test`.
# Each sets up .venv itself. torch is installed first (CPU build unless one is already present),
# so pip does not pull a multi-GB CUDA build as a dependency of the package.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= demo

.PHONY: venv test demo lint docker clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/hadolint --failure-threshold warning docker/Dockerfile

demo: venv
	$(PY) -m trunet.demo --out $(DEMO_DIR)

docker:
	docker build -f docker/Dockerfile -t trunet:latest .

clean:
	rm -rf $(VENV) $(DEMO_DIR) build dist *.egg-info
