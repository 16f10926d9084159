# mnn: the two commands of the README, and the ones behind them.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: run test data docs docs-screenshot docs-tools chromium bench clean

run: $(VENV)/.installed-cli data          ## train the default MLP on Fashion-MNIST, print test accuracy
	$(VENV)/bin/mnn train mlp --out runs/mlp

test: $(VENV)/.installed-test data docs-tools  ## the whole suite, as CI runs it
	$(PY) -m pytest -q

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed-cli: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[cli,fast]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[test]'
	touch $@ $(VENV)/.installed-cli

$(VENV)/.installed-docs: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[docs]'
	touch $@

# Fashion-MNIST from Debian's package when we can install it; otherwise mnn
# downloads it into its cache folder on first use (sha256-checked).
data:
	@if [ -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: $(FASHION_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	    || echo "apt could not install dataset-fashion-mnist; mnn will download it"; \
	else \
	  echo "Fashion-MNIST not installed; mnn will download it on first use"; \
	fi

# The documentation: regenerate docs/gradcheck.json and the Markdown API
# reference from the docstrings, then build the HTML site into site/.
docs: $(VENV)/.installed-docs docs-tools
	$(PY) tools/gradcheck_report.py
	$(PY) tools/api_docs.py
	$(PY) tools/build_docs.py --site-dir site

docs-screenshot: docs                     ## docs/img/MatrixProduct.png, to look at the rendered matrices
	$(PY) tools/render_check.py site --screenshot api/MatrixProduct.html docs/img/MatrixProduct.png

# What tests/test_docs.py needs beyond Python: KaTeX and MathJax from npm
# (package-lock.json), and Debian's chromium for the rendering checks.
docs-tools: node_modules/.package-lock.json chromium

node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

chromium:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
	  echo "chromium not found and cannot apt-get it: the docs rendering tests will fail"; \
	fi

bench: $(VENV)/.installed-test           ## mnn vs PyTorch side by side: benchmarks/results.json and results.png
	$(PY) -m benchmarks.compare

clean:
	rm -rf $(VENV) runs site .pytest_cache node_modules docs/javascripts/vendor
