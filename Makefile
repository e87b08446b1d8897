# Two entry points on a fresh machine: `make demo` and `make test` (see README).
PY ?= python3
# The CPU wheel keeps CI small; on a GPU machine an already installed torch is kept as is.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-gpu bench

.installed: pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch .installed

.installed-test: .installed
	$(PY) -m pip install -q -e ".[test]"
	@# The browser test drives Debian's Chromium (tests/test_serve_browser.py).
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
		echo "warning: could not install chromium + chromium-driver; the browser test will fail"
	touch .installed-test

install: .installed

demo: .installed
	$(PY) -m turbovid.cli generate --prompt "a red circle moves to the right on a dark background" \
		--output outputs/demo.mp4

test: .installed-test
	TRITON_INTERPRET=1 $(PY) -m pytest -q

test-gpu: .installed-test
	$(PY) -m pytest -q -m gpu -o addopts=""

bench:
	$(PY) benchmarks/kernels.py
