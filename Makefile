# Two commands do everything: `make demo` and `make test`. Each builds its own venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test-only: MergeKit 0.1.5, the reference of the merge engine (tests/test_mergekit_*.py), in
# a venv of its own so it never becomes a dependency of mpstore.
MK_VENV := .venv-mergekit
MK_STAMP := $(MK_VENV)/.installed

.PHONY: venv mergekit-venv demo test check bench clean

# torch is pinned to the CPU build that lies on the machine's disk; any other version pulls CUDA.
# The checkers are pinned too, so a new release cannot turn CI red on code that did not change.
# An editable install leaves mpstore uncompiled, and where PYTHONDONTWRITEBYTECODE is set every
# `mp` compiled it again (70 ms of its 250 ms start): compileall once (a stale file is recompiled
# in memory, never used stale).
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]' torch==2.13.0 lmdb==3.0.0 numba==0.68.1 boto3==1.44.8 moto==5.2.5 huggingface_hub==2.4.0 zstandard==0.25.0 mypy==2.4.1 ruff==0.17.6
	$(BIN)/python -m compileall -q mpstore
	touch $(STAMP)

venv: $(STAMP)

# torch first and pinned again with mergekit, so pip keeps the CPU build (about a minute, 1.6 GB).
$(MK_STAMP):
	rm -rf $(MK_VENV)
	$(PY) -m venv $(MK_VENV)
	$(MK_VENV)/bin/pip install -q --upgrade pip
	$(MK_VENV)/bin/pip install -q torch==2.13.0
	$(MK_VENV)/bin/pip install -q mergekit==0.1.5 torch==2.13.0
	touch $(MK_STAMP)

mergekit-venv: $(MK_STAMP)

demo: $(STAMP)
	bash tools/demo.sh

# CI (CI set, not 0/false/no) always runs the MergeKit comparison, so it builds its venv first;
# elsewhere the comparison is skipped, with the reason, until `make mergekit-venv` has been run.
test: check
	@case "$${CI:-}" in ""|0|false|False|FALSE|no|No|NO) ;; *) $(MAKE) mergekit-venv ;; esac
	$(BIN)/python -m pytest -q

# Static checks (configured in pyproject.toml): lint everything, type-check mpstore/, and keep
# torch out of `import mpstore` (the CLI's reading commands start without it).
check: $(STAMP)
	$(BIN)/ruff check mpstore tests tools
	$(BIN)/mypy
	$(BIN)/python -c "import mpstore, sys; assert 'torch' not in sys.modules, 'import mpstore loads torch'"

bench: $(STAMP)
	$(BIN)/python tools/bench_store.py

clean:
	rm -rf $(VENV) $(MK_VENV) demo bench
