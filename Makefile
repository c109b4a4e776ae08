# scone-ops: `make pipeline` runs the whole chain on the embedded default; `make test` runs the tests.
# torch is installed first from its pinned CPU build: a bare `torch` requirement on a clean machine pulls CUDA wheels.
PY ?= python3
PIP ?= $(PY) -m pip
STAMP := .make/installed

.PHONY: install install-browser pipeline test test-fast repro report clean-artifacts serve-deployment mlflow-ui

$(STAMP): pyproject.toml
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

# headless Chromium for tests/test_report_browser.py (Debian package; needs root, as CI has: .ci/run calls it)
install-browser:
	command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

pipeline: install
	scone pipeline

test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

repro: install
	dvc repro

report: install
	scone report

serve-deployment: install
	scone serve

mlflow-ui: install
	mlflow ui --backend-store-uri sqlite:///artifacts/mlflow.db --port 5000

clean-artifacts:
	rm -rf artifacts/* .dvc/cache
