# Every target sets itself up: a fresh clone needs only Python 3.11 and `make demo` / `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Exactly this torch: a looser pin would pull a multi-GB CUDA build instead of the CPU wheel on disk.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench docs longctx clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test]" "$(TORCH_PIN)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ringattn demo

# The exactness suites again through the test-only backends of tests/backends.py, which take the kernel
# seam's paths no CPU kernel takes (whole partial pairs; bottom-right causal alignment).
SEAM_SUITES := tests/test_ring.py tests/test_masks_on_ring.py tests/test_strategies.py tests/test_bottom_right.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
	RINGATTN_TEST_BACKEND=test-native-partial $(PY) -m pytest -q $(SEAM_SUITES)
	RINGATTN_TEST_BACKEND=test-bottom-right $(PY) -m pytest -q $(SEAM_SUITES)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m benchmarks all --out docs/bench --report docs/benchmarks.md

docs: bench

# Train a model that retrieves a passkey at every depth of a context one process cannot train on (4 ranks,
# ring attention), evaluate it, plot it, ship it to examples/checkpoints/passkey/.
longctx: $(STAMP)
	$(PY) -m benchmarks passkey --out docs/bench --report docs/benchmarks.md

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
