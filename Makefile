# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= demo_out

.PHONY: install demo test bench bench-segment clean

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

bench: install
	$(PY) Testing/benchmarks/bench_pretrain.py

bench-segment: install
	$(PY) Testing/benchmarks/bench_segment.py

clean:
	rm -rf $(VENV) $(DEMO_OUT)
