# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv data test demo report bench broker-stop clean

venv: $(STAMP)

# The venv is brought up to date only when one of these files changes: the pinned runtime
# and test requirements, then this package itself (editable, so edits need no reinstall).
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt \
		-r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# Real datasets: Fashion-MNIST from Debian's dataset-fashion-mnist package.
data:
	@bash execution_scripts/get_data.sh

test: venv data
	$(PY) -m pytest -q tests

demo: venv data
	bash execution_scripts/demo.sh

# Plots and report.md for the latest run under $(LOGS) (the one whose run.json changed last),
# in its report/ folder: what the demo's last line says to run.
LOGS ?= logs
report:
	@run=$$(ls -td $(LOGS)/*/run.json 2>/dev/null | head -n 1); \
	if [ -z "$$run" ]; then echo "no run in $(LOGS)/: make demo first"; exit 2; fi; \
	run=$$(dirname "$$run"); \
	$(PY) -m scadles.report "$$run" --out "$$run/report"

bench: venv data
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

broker-stop:
	-$(PY) -m streamsim.broker stop

clean:
	rm -rf logs .run
