# The README's commands. Everything runs offline from PyPI pins; nothing needs to be installed by hand.
SHELL := /bin/bash
# The interpreter the venv is made from, resolved before the venv goes on PATH.
ifndef PYTHON
PYTHON := $(shell command -v python3.11 || command -v python3)
endif
UV_VERSION := 0.13.8
UV := .tools/bin/uv
VENV := .venv
BIN := $(VENV)/bin
# dvc.yaml's stage commands are `imgpipe <stage>`: the venv's bin comes first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export UV_NO_PROGRESS := 1

.PHONY: setup demo test test-fast bench lint typecheck dvc-yaml docs ui serve image sample-data clean

$(UV):
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target .tools "uv==$(UV_VERSION)"

# --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set (CI, containers), Python never caches
# bytecode, so every stage process and test worker would compile TensorFlow from source again
# (import tensorflow: 13.5 s uncompiled, 4.7 s compiled, on the 2-core VM).
$(BIN)/imgpipe: $(UV) pyproject.toml requirements.lock
	$(UV) venv --quiet --clear --seed --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --compile-bytecode --python $(BIN)/python -c requirements.lock -e ".[dev]"
	@touch $@

setup: $(BIN)/imgpipe  ## a uv-managed .venv with the project installed

sample-data: setup  ## the offline ELPV sample data in data/ (matches data.dvc)
	$(BIN)/imgpipe sample-data data

demo: sample-data  ## set up, get the sample data, run the DVC pipeline end to end
	$(BIN)/dvc repro
	$(BIN)/imgpipe summary

# Test modules run side by side, one whole module per worker process (module fixtures run once),
# handed out in collection order: the end-to-end modules first (tests/conftest.py).
PYTEST_WORKERS ?= --numprocesses logical --maxprocesses 4 --dist loadfile --no-loadscope-reorder
test: setup  ## the whole test suite, offline, a module per core (up to 4)
	$(BIN)/pytest $(PYTEST_WORKERS)

test-fast: setup  ## the inner loop: the code and data tests (tests/code, tests/data) but the slow ones
	$(BIN)/pytest $(PYTEST_WORKERS) -m "(code or data) and not slow"

bench: demo  ## every benchmark on the demo's outputs: JSON and summary.md in bench/results/
	$(BIN)/python -m bench

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

dvc-yaml: setup  ## rewrite dvc.yaml from the stage declarations (pipelines/stages.py)
	$(BIN)/python -m pipelines.dvc

docs: setup  ## render the README's and docs/accuracy.md's figure tables from metrics/ and docs/accuracy.yaml
	$(BIN)/python -m pipelines.figures_doc

ui: setup  ## MLflow UI on 127.0.0.1 to compare runs
	$(BIN)/imgpipe ui --host 127.0.0.1 --port 5000

# The local TF Serving stand-in on the pushed models, with the config files the real
# tensorflow/serving container uses; the model config is serving/models.config rendered for
# params.yaml's serving.model_name (models/ is mounted where its base_path points). Clients talk
# to the logging sidecar on 127.0.0.1:8500, which passes every call to the server on :8490 and
# logs sampled Predict/Classify calls into request_log.directory (imgpipe monitor reads them).
# Plaintext gRPC on loopback; for TLS add --ssl-config-file ssl.config to SIDECAR_FLAGS
# (serving/README.md, TLS).
SERVE_FLAGS ?= --port 8490 --rest_api_port 8501 --enable_batching
SIDECAR_FLAGS ?= --port 8500
SERVING_MODEL_CONFIG := outputs/serving/models.config
serve: setup  ## serve models/ over TF Serving's gRPC API on 127.0.0.1:8500, logged (REST and metrics on :8501)
	@test -d models || { echo "no models/ yet: run make demo first (push copies the champion there)"; exit 1; }
	$(BIN)/python -m serving.config --params params.yaml --out $(SERVING_MODEL_CONFIG)
	$(BIN)/python -m serving.server --model_config_file $(SERVING_MODEL_CONFIG) \
		--mount $(CURDIR)/models:/models \
		--batching_parameters_file serving/batching.config \
		--monitoring_config_file serving/monitoring.config $(SERVE_FLAGS) & server=$$!; \
	trap 'kill $$server 2>/dev/null; wait $$server' EXIT; \
	$(BIN)/imgpipe sidecar --upstream 127.0.0.1:8490 $(SIDECAR_FLAGS)

# Container images (infra/docker); IMAGE_BUILD_ARGS="--build-arg BASE=tensorflow/tensorflow:2.21.0"
# for a CPU components image.
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image:  ## build the components, serving and MLflow images (needs a running Docker engine)
	@docker info >/dev/null 2>&1 || { echo "make image: no Docker engine answers (docker info failed); see infra/README.md"; exit 1; }
	docker build -f infra/docker/components.Dockerfile $(IMAGE_BUILD_ARGS) -t imgpipe-components:$(IMAGE_TAG) .
	docker build -f infra/docker/serving.Dockerfile -t imgpipe-serving:$(IMAGE_TAG) .
	docker build -f infra/docker/mlflow.Dockerfile -t imgpipe-mlflow:$(IMAGE_TAG) .

clean:  ## remove pipeline outputs (not the venv, not the data, not pushed models)
	rm -rf outputs mlflow.db mlartifacts

print-%:
	@echo '$($*)'
