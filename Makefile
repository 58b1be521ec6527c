# Two commands do everything on a fresh machine:
#   make demo   install, fetch MovieLens-100K, train, evaluate against baselines
#   make test   install, run the default test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install demo test test-all data bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/behaviorlm demo

# pytest exits 5 when a (sub)set collects no tests: that is not a failure here.
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-all: install
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

data: install
	$(BIN)/behaviorlm fetch-movielens

bench: data
	$(BIN)/python benchmarks/tokenizer_choice.py
	$(BIN)/python benchmarks/pretrain.py --dataset ml-1m
	$(BIN)/python benchmarks/pretrain.py --dataset taobao --no-exclude-seen --epochs 40 --max-len 100 --batch-size 32

lint: install
	$(BIN)/ruff check behaviorlm tests benchmarks pipelines

clean:
	rm -rf $(VENV) build .pytest_cache
