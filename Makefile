# Every target does its own set-up: a fresh clone needs only `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install serve test check lint typecheck pytest demo bench soak reproduce clean

# Python packages into the venv (editable, with the test tools and Ray), and the browser libraries the app
# serves itself (htmx, pinned in package-lock.json) into node_modules/: needs Node 18+ and npm.
# A wheel carries its own copy instead (docs/deploy.md).
$(STAMP): pyproject.toml package-lock.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	npm ci --no-audit --no-fund
	touch $(STAMP)

install: $(STAMP)

# The dashboard on http://127.0.0.1:8000 (data in ~/.local/share/gradwatch unless GRADWATCH_DATA_DIR says otherwise).
serve: $(STAMP)
	$(VENV)/bin/gradwatch serve $(SERVE_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check app trainer gradwatch tests bench examples hatch_build.py

typecheck: $(STAMP)
	$(PY) -m mypy

pytest: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

check: lint typecheck

test: check pytest

# Train both ring presets headless and leave their samples in runs/.
demo: $(STAMP)
	$(VENV)/bin/gradwatch train --preset ring8-saturating --out runs/ring8-saturating
	$(VENV)/bin/gradwatch train --preset ring8-non-saturating --out runs/ring8-non-saturating

# The trackers the benchmarks compare against (TensorBoard, wandb, Trackio): the `bench` extra, on top of the dev install.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,ray,bench]'
	touch $(BENCH_STAMP)

# Every benchmark at sizes that finish in under 10 minutes on 2 cores: a table here, JSON in bench/results/.
# The documented full-size runs and their figures: docs/benchmarks.md. The browser one needs Debian's chromium.
bench: $(STAMP) $(BENCH_STAMP)
	$(PY) -m bench.run_all $(BENCH_ARGS)

# Issue 12's soak, not part of `make test`: 8 runs × 20 clients for 10 minutes on loopback, the server killed and
# restarted halfway; exits 1 on any seq gap, lost frame, 5xx or RSS growth. Figures: docs/reliability.md.
# A shorter one: make soak SOAK_ARGS='--minutes 2 --runs 4 --clients 8'
soak: $(STAMP)
	$(PY) -m bench.soak $(SOAK_ARGS)

# Issue 16's published experiments on their protocol, not part of `make test` (about 40 minutes on 2 cores):
# PacGAN Table 1 at the default CPU budget and the Arjovsky-Bottou study, into reproductions/. Figures:
# docs/reproductions.md. Larger budgets: make reproduce REPRO_ARGS='--steps 20000'
reproduce: $(STAMP)
	$(VENV)/bin/gradwatch reproduce pacgan-table1 $(REPRO_ARGS)
	$(VENV)/bin/gradwatch reproduce arjovsky-bottou

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache build dist
