# mnn: the two commands of the README, and the ones behind them.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: run test data docs bench clean

run: $(VENV)/.installed-cli data          ## train the default MLP on Fashion-MNIST, print test accuracy
	$(VENV)/bin/mnn train mlp --out runs/mlp

test: $(VENV)/.installed-test data        ## the whole suite, as CI runs it
	$(PY) -m pytest -q

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed-cli: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[cli]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[test]'
	touch $@ $(VENV)/.installed-cli

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

clean:
	rm -rf $(VENV) runs site .pytest_cache
