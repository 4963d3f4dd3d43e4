# Every target sets itself up: a fresh clone needs only Python 3.11 and `make demo` / `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Exactly this torch: a looser pin would pull a multi-GB CUDA build instead of the CPU wheel on disk.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-compat test-slow lint bench docs longctx clean

# Unpinned dependencies resolve to their newest releases: CI's fresh clone tests what a new user installs.
$(STAMP): pyproject.toml
	@echo "==> set-up 1/3: a virtual environment in $(VENV) (first use only; a few minutes in all)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "==> set-up 2/3: $(TORCH_PIN) (CPU build)"
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	@echo "==> set-up 3/3: ringattn and its test tools (transformers, accelerate, pytest, ...)"
	$(PY) -m pip install --quiet --upgrade -e ".[test]" "$(TORCH_PIN)"
	touch $(STAMP)
	@echo "==> set-up done"

# The oldest release of every declared dependency (.ci/oldest.txt), in a venv of its own.
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.installed
COMPAT_SUITES := tests/test_packaging.py tests/test_ring.py tests/test_masks_on_ring.py tests/test_strategies.py \
	tests/test_autograd.py tests/test_kernels.py tests/test_score_mods.py tests/test_checkpoint.py tests/test_train.py \
	tests/test_hf.py tests/test_hf_generate.py tests/test_hf_trainer.py tests/test_hf_sweep.py tests/test_audit.py

$(COMPAT_STAMP): pyproject.toml .ci/oldest.txt
	@echo "==> compat set-up: the oldest declared dependencies (.ci/oldest.txt) in $(COMPAT_VENV)"
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --upgrade pip
	$(COMPAT_PY) -m pip install --quiet -c .ci/oldest.txt "$(TORCH_PIN)"
	$(COMPAT_PY) -m pip install --quiet -c .ci/oldest.txt -e ".[test,progress,plot]"
	touch $(COMPAT_STAMP)

demo: $(STAMP)
	$(VENV)/bin/ringattn demo

# The exactness suites again through the test-only backends of tests/backends.py, which take the kernel
# seam's paths no CPU kernel takes (whole partial pairs; bottom-right causal alignment; band tasks and ALiBi
# natively; a block pair's tasks in one call). test-varlen declares all of test-band's paths and more, so
# test-band alone runs only the mask suite (its top-left band alignment).
SEAM_SUITES := tests/test_ring.py tests/test_masks_on_ring.py tests/test_strategies.py tests/test_bottom_right.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
	RINGATTN_TEST_BACKEND=test-native-partial $(PY) -m pytest -q $(SEAM_SUITES)
	RINGATTN_TEST_BACKEND=test-bottom-right $(PY) -m pytest -q $(SEAM_SUITES)
	RINGATTN_TEST_BACKEND=test-band $(PY) -m pytest -q tests/test_masks_on_ring.py
	RINGATTN_TEST_BACKEND=test-varlen $(PY) -m pytest -q $(SEAM_SUITES)

test-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -m pip list 2>/dev/null | grep -E -i '^(torch|numpy|transformers|accelerate|tqdm|matplotlib) '
	RINGATTN_COMPAT=1 $(COMPAT_PY) -m pytest -q $(COMPAT_SUITES)

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
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info src/*.egg-info
