# Two entry points on a fresh machine: `make demo` and `make test` (see README).
PY ?= python3
# The CPU wheel keeps CI small; on a GPU machine an already installed torch is kept as is.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-gpu bench

.installed: pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch .installed

install: .installed

demo: .installed
	$(PY) -m turbovid.cli generate --prompt "a red circle moves to the right on a dark background" \
		--output outputs/demo.mp4

test: .installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q -x

test-gpu:
	$(PY) -m pytest -q -m gpu -o addopts=""

bench:
	$(PY) benchmarks/kernels.py
