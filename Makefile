# The README's two commands are `make demo` and `make test`; everything else is a step of them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
# A project-local Prefect home: its SQLite database, settings and logs stay in the checkout.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup demo test ui app bench clean corpus pacs

setup: $(VENV)/.installed

# constraints.txt locks every package (torch 2.14.1 and torchvision 0.29.1 come from local disk).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/dvc config --local core.analytics false 2>/dev/null || true
	touch $@

demo: setup
	scripts/with-prefect-server.sh dvc repro

# Two workers, one test file each at a time (a file's module fixtures stay in one process): run
# serially the suite kept the 2 cores only 55% busy (servers, subprocesses, browser waits).
test: setup
	scripts/install-chromium.sh
	scripts/install-orthanc.sh
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

ui: setup
	scripts/prefect-server.sh foreground

# The web app on http://127.0.0.1:8000 (the demo's registered model; CXR_APP_TOKEN to bind elsewhere).
app: setup
	$(BIN)/cxr app --host $${CXR_APP_HOST:-127.0.0.1} --port $${CXR_APP_PORT:-8000}

# A real PACS to try `cxr score --dicomweb` on: Orthanc on loopback, authentication on, storage in
# .orthanc/ (scripts/pacs.sh stop|status). The password is in .orthanc/password, never printed.
pacs: setup
	@scripts/pacs.sh start
	@echo "then: cxr score --dicomweb <the URL above> --out data/reports/pacs; scripts/pacs.sh stop when done"

# Every benchmark writes benchmarks/results/<name>.json; run on an otherwise idle machine.
bench: setup
	$(BIN)/python benchmarks/bench_ingest_split.py
	$(BIN)/python benchmarks/bench_attention.py
	$(BIN)/python benchmarks/bench_image_cache.py
	$(BIN)/python benchmarks/bench_crop_cache.py
	$(BIN)/python benchmarks/bench_score.py
	$(BIN)/python benchmarks/bench_ddp.py
	$(BIN)/python benchmarks/bench_dask_cache.py
	$(BIN)/python benchmarks/bench_dask_score.py

# The bad-input corpus (generated, never committed): images/DICOMs and faulty metadata CSVs,
# and the out-of-distribution corpus (photos, MR/CT slices, noise, text; near: a turned radiograph).
corpus: setup
	$(BIN)/python tests/data/make_bad_corpus.py tests/data/bad/images
	$(BIN)/python tests/data/make_bad_metadata.py ../shared/data/nih-sample-64/Data_Entry_sample.csv tests/data/bad/metadata
	$(BIN)/python tests/data/make_ood_corpus.py tests/data/ood --studies ../shared/data/studies

clean:
	rm -rf data/raw data/interim data/processed data/cache data/models data/metrics data/reports .prefect
