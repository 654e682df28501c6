# One-command set-up on a fresh machine: `make demo` runs the main job, `make test` the tests.
PY ?= python3
SUDO := $(shell [ "$$(id -u)" != 0 ] && command -v sudo)
STAMP := .install-stamp

$(STAMP): pyproject.toml
	@command -v dot >/dev/null || { $(SUDO) apt-get install -y -qq graphviz >/dev/null || \
	  echo "graphviz could not be installed: dumps keep .dot pictures instead of .svg"; }
	$(PY) -m pip install -q torch==2.13.0          # first and exactly: the local CPU wheel (others pull CUDA)
	$(PY) -m pip install -q -e '.[dev,tvm,distributed]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -n 2

test-slow: $(STAMP)   # tuning, a killed tuning run, arm64 bundles under qemu (root once): one at a time, as
	$(PY) -m pytest -q -n 0 -m slow   # MetaSchedule's timed budget and the kill test need the cores to themselves

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 -m ''

bench: $(STAMP)
	$(PY) benchmarks/bench_spine.py

# the documentation site: every page's examples run first (doctest), then the HTML; any warning (a broken link or
# anchor, a docstring autodoc cannot read) fails the build. Open docs/_build/html/index.html
SPHINX := $(PY) -m sphinx -E -W --keep-going -n -q
docs: $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	$(SPHINX) -b doctest -d docs/_build/doctrees docs docs/_build/doctest
	$(SPHINX) -b html -d docs/_build/doctrees docs docs/_build/html

.PHONY: install demo test test-slow test-all bench docs
