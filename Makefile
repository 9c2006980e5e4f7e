# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= demo_out
# Slicer 5.10+ runs Python 3.12: the Slicer-side tests (Testing/extension) run there too, in a venv
# without torch (the engine they start is $(PY)).
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) \
                         $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null))
VENV312 := .venv-slicer312

.PHONY: install demo test test-slicer-py312 bench bench-segment bench-cli bench-serve clean

$(VENV)/.installed: pyproject.toml constraints.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[test]"
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/voco demo --out $(DEMO_OUT)

# The browser tests need Debian's chromium, VoCo Studio Mesa's EGL/OSMesa; the script installs them
# where it may (root + apt-get).
test: install
	@sh Testing/e2e/install_system_packages.sh
	$(PY) -m pytest -q
	$(MAKE) test-slicer-py312

$(VENV312)/.installed: Testing/extension/requirements.txt constraints.txt
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q --upgrade pip
	$(VENV312)/bin/python -m pip install -q -c constraints.txt -r Testing/extension/requirements.txt
	touch $@

test-slicer-py312: install
	@if [ -z "$(PYTHON312)" ]; then echo "test-slicer-py312: no Python 3.12 on this machine; the Slicer-side tests ran on $$($(PY) --version) only"; \
	else $(MAKE) $(VENV312)/.installed && VOCO_ENGINE_PYTHON=$(abspath $(PY)) $(VENV312)/bin/python -m pytest -q Testing/extension; fi

bench: install
	$(PY) Testing/benchmarks/bench_pretrain.py

bench-segment: install
	$(PY) Testing/benchmarks/bench_segment.py

bench-cli: install
	$(PY) Testing/benchmarks/bench_cli.py

bench-serve: install
	$(PY) Testing/benchmarks/bench_serve.py

clean:
	rm -rf $(VENV) $(VENV312) $(DEMO_OUT)
