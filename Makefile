# Two commands do everything on a fresh machine:
#   make demo   install, fetch MovieLens-100K, train, evaluate against baselines
#   make test   install, run the default test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install system-deps demo test test-all data bench bench-ab serve dashboard lint clean

# Debian packages the browser test (chromium + chromedriver) and the API load test (wrk) use.
# Needs root or sudo; without either it says so and the browser test skips with that reason.
SYSTEM_PKGS := chromium chromium-driver wrk
system-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v wrk >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PKGS) >/dev/null \
	  || (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PKGS) >/dev/null); \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PKGS) >/dev/null; \
	else echo "system-deps: cannot install $(SYSTEM_PKGS) (not root, no sudo); the browser test will skip"; fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/behaviorlm demo

# pytest exits 5 when a (sub)set collects no tests: that is not a failure here.
test: install system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-all: install system-deps
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

data: install
	$(BIN)/behaviorlm fetch-movielens

bench: data
	$(BIN)/python benchmarks/tokenizer_choice.py
	$(BIN)/python benchmarks/pretrain.py --dataset ml-1m
	$(BIN)/python benchmarks/pretrain.py --dataset taobao --recipe clickstream-small --no-exclude-seen --max-minutes 8

# A/B against another checkout (git worktree add ../base COMMIT), interleaved in one run:
#   make bench-ab BASE=../base MODEL=data/models/ml-1m-loo   (~2 min train check + ~5 min scoring)
bench-ab: data
	$(BIN)/python benchmarks/ab_compare.py train --base $(BASE) --epochs 2
	$(BIN)/python benchmarks/ab_compare.py score --base $(BASE) --model $(MODEL) --rounds 5

serve: install
	$(BIN)/behaviorlm serve --model models:/behaviorlm@champion --segments data/outputs/segments

# the segment dashboard over data/outputs (BEHAVIORLM_OUTPUTS to change), at http://127.0.0.1:8501
dashboard: install
	$(BIN)/behaviorlm dashboard

lint: install
	$(BIN)/ruff check behaviorlm tests benchmarks pipelines dashboards

clean:
	rm -rf $(VENV) build .pytest_cache
