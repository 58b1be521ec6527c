# Two commands do everything on a fresh machine:
#   make demo   install, then the main job on the Taobao clickstream sample: train, evaluate,
#               score, segment, explain (MLflow runs, model registered), and a summary (~5 min)
#   make test   install, run the default test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DIGEST := $(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
STAMP  := $(VENV)/.installed-dev-$(DIGEST)
STAMP_APP := $(VENV)/.installed-app-$(DIGEST)
PYTEST_ARGS ?=

.PHONY: install gpu-check install-app system-deps demo demo-movielens test test-all data cdnow serve dashboard mlflow-ui lint format \
	typecheck docs docs-build clean bench bench-list bench-ab bench-api-ab $(BENCH_TARGETS)

# Debian packages the browser test (chromium + chromedriver) and the API load test (wrk) use.
# Needs root or sudo; without either it says so and the browser test skips with that reason.
SYSTEM_PKGS := chromium chromium-driver wrk
system-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v wrk >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PKGS) >/dev/null \
	  || (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PKGS) >/dev/null); \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PKGS) >/dev/null; \
	else echo "system-deps: cannot install $(SYSTEM_PKGS) (not root, no sudo); the browser test will skip"; fi

# Two installs into one venv: the app (core + serve + dashboard: what `make demo` and the commands it
# suggests need) and dev (everything: tests, lint, docs, spark). Each is redone when pyproject.toml
# or constraints.txt changes. The app install skips byte-compiling (75 s instead of 150 s on 2 cores;
# Python compiles what it imports); the dev install byte-compiles everything, for the test suite's
# many short processes.
$(STAMP_APP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -e '.[serve,dashboard,ann]' -c constraints.txt
	rm -f $(VENV)/.installed-app-*; touch $(STAMP_APP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]' -c constraints.txt
	$(BIN)/python -m compileall -q -j0 $(VENV)/lib/python*/site-packages >/dev/null || true
	rm -f $(VENV)/.installed-dev-* $(VENV)/.installed-app-*; touch $(STAMP) $(STAMP_APP)

install-app: $(STAMP_APP)
install: $(STAMP)

demo: install-app
	$(BIN)/python -m pipelines.demo

# the single-action quick start: MovieLens-100K fetched from PyPI, train + evaluate (~2 min)
demo-movielens: install-app
	$(BIN)/behaviorlm demo

# pytest exits 5 when a (sub)set collects no tests: that is not a failure here.
test: install system-deps cdnow
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-all: install system-deps cdnow
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

data: install
	$(BIN)/behaviorlm fetch

# CDNOW's 23,570 purchase histories (the lifetimes wheel from PyPI, sha256-checked; ~2 s, idempotent):
# the BTYD tests compare against the published estimates on its 1/10 sample
cdnow: install
	$(BIN)/behaviorlm fetch --name cdnow

# One target per section of benchmarks/RESULTS.md; expected wall time on 2 cores in brackets.
# Each script prints its table and writes benchmarks/out/*.json with the commit it ran on.
BENCH_TARGETS := bench-pretrain-ml1m bench-pretrain-taobao bench-tokenizer bench-scoring \
	bench-propensity bench-segments bench-explain bench-pipeline bench-api bench-notebooks bench-bad-input \
	bench-scale bench-scale-large bench-scale-train bench-scale-train-large bench-incremental \
	bench-retrieval bench-engines bench-api-production bench-propensity-cdnow bench-side-features \
	bench-clickstream bench-clickstream-ml1m bench-clickstream-cost bench-served-vs-batch bench-attribution bench-ig-captum \
	bench-finetune bench-adapters bench-ml1m bench-ml1m-time bench-ml1m-time-ab bench-ml1m-recipes-ab bench-peer-rectools \
	bench-sparse-train bench-score-scale bench-api-fast
ML1M_MODEL := data/models/ml-1m-loo-d01

bench: $(BENCH_TARGETS)

# the benchmark targets with their RESULTS.md section and expected wall time
# section 29 [~6 min on a GPU machine; says "skipped" without one]: ML-1M 3 epochs on cuda vs cpu, losses, s/epoch, NDCG@10
gpu-check: data
	$(BIN)/python benchmarks/gpu_check.py --devices cuda,cpu --epochs 3

bench-list:
	@awk '/^# section/ {c=$$0} /^bench-[a-z0-9-]+:/ && c {sub(":.*","",$$1); printf "%-24s %s\n", $$1, substr(c,3); c=""}' Makefile

# section 1 [~30 min]: ML-1M leave-one-out pretraining, full-catalog NDCG@10 vs baselines
bench-pretrain-ml1m: data
	$(BIN)/python benchmarks/pretrain.py --dataset ml-1m --epochs 30 --dropout 0.1 --save $(ML1M_MODEL)

# section 27 [~30 min idle]: the ML-1M record, history only (time_context=history), recipe ml-1m@2
bench-ml1m: data
	$(BIN)/python benchmarks/pretrain.py --dataset ml-1m --recipe ml-1m@2 --time-context history --max-minutes 30 \
		--tag ml1m2_history --save data/models/ml-1m-loo-v2

# section 27 [~30 min idle]: ML-1M request-time aware (the target's time as the request time), recipe ml-1m@2
bench-ml1m-time: data
	$(BIN)/python benchmarks/pretrain.py --dataset ml-1m --recipe ml-1m@2 --time-context request --max-minutes 30 \
		--tag ml1m2_request --save data/models/ml-1m-loo-tc-request-v2

# section 27 [<1 min, after bench-ml1m and bench-ml1m-time]: the two rows paired on the same users
bench-ml1m-time-ab: data
	test -d data/models/ml-1m-loo-v2 || $(MAKE) bench-ml1m
	test -d data/models/ml-1m-loo-tc-request-v2 || $(MAKE) bench-ml1m-time
	$(BIN)/python benchmarks/time_context_ab.py

# section 27 [<1 min, after bench-pretrain-ml1m and bench-ml1m]: ml-1m@1 against ml-1m@2 on the same users
bench-ml1m-recipes-ab: data
	test -d $(ML1M_MODEL) || $(MAKE) bench-pretrain-ml1m
	test -d data/models/ml-1m-loo-v2 || $(MAKE) bench-ml1m
	$(BIN)/python benchmarks/paired_models.py $(ML1M_MODEL) data/models/ml-1m-loo-v2 --labels ml-1m@1 ml-1m@2

# section 27 [~35 min, after bench-ml1m]: RecTools' SASRec trained for 30 min beside the ml-1m@2 model that
# bench-ml1m trained (30 min), both ranked and scored here; RecTools lives in its own virtual environment
# (.venv-rectools), never in behaviorlm's
RECTOOLS_VENV := .venv-rectools
$(RECTOOLS_VENV)/bin/python:
	$(PYTHON) -m venv $(RECTOOLS_VENV)
	$(RECTOOLS_VENV)/bin/pip install -q -c constraints.txt "rectools[torch]==0.19.0"

bench-peer-rectools: data $(RECTOOLS_VENV)/bin/python
	test -d data/models/ml-1m-loo-v2 || $(MAKE) bench-ml1m
	$(BIN)/python benchmarks/peer_rectools.py --model data/models/ml-1m-loo-v2 --rectools-python $(RECTOOLS_VENV)/bin/python

# section 1b [~8 min]: Taobao next (action, item), seen items kept
bench-pretrain-taobao: install
	$(BIN)/python benchmarks/pretrain.py --dataset taobao --recipe clickstream-small --no-exclude-seen --max-minutes 8

# section 2 [<1 min]: composite vs factorised tokens
bench-tokenizer: install
	$(BIN)/python benchmarks/tokenizer_choice.py

# section 3 [~5 min, after bench-pretrain-ml1m]: batch scoring fp32 vs int8
bench-scoring: data
	test -d $(ML1M_MODEL) || $(MAKE) bench-pretrain-ml1m
	$(BIN)/python benchmarks/scoring.py --model $(ML1M_MODEL) --dataset ml-1m

# section 4 [~25 min]: propensity, transformer vs LightGBM, Taobao / Instacart / REES46 (the 0.4 methods)
bench-propensity: install
	$(BIN)/python benchmarks/propensity.py --dataset taobao --dataset instacart --dataset rees46 \
	  --methods heuristic lightgbm_seed lightgbm transformer zero_shot

# section 19 [~2.5 h on 2 cores]: CDNOW, calibration/holdout, every method, with and without amount tokens
# (paired A/B on the same test users); rolling origin with the methods that need no fine-tuning
# (its 75k training examples make each fine-tune ~6x a holdout one); the clickstreams in the same table
bench-propensity-cdnow: install cdnow
	$(BIN)/python benchmarks/propensity.py --dataset cdnow --value-buckets 8 --pretrain-epochs 8 --ft-epochs 6 \
	  --skip-churn --skip-rolling --methods lightgbm_rfm lightgbm bgnbd paretonbd transformer fusion joint multitask --tag vb8fix
	$(BIN)/python benchmarks/propensity.py --dataset cdnow --value-buckets 0 --pretrain-epochs 8 --ft-epochs 6 \
	  --methods transformer fusion joint --skip-rolling --tag vb0
	$(BIN)/python benchmarks/propensity_ab.py --a vb8fix --b vb0 --task cdnow_holdout_conversion_39w \
	  --task cdnow_holdout_conversion_13w
	$(BIN)/python benchmarks/propensity.py --dataset cdnow --value-buckets 8 --pretrain-epochs 8 --skip-holdout \
	  --methods lightgbm_rfm lightgbm bgnbd paretonbd fusion --tag rolling
	$(BIN)/python benchmarks/propensity.py --dataset taobao --dataset rees46 --dataset instacart --skip-early \
	  --ft-epochs 10 --pretrain-epochs 15 --tag v06
	for vb in 0 8; do $(BIN)/python benchmarks/propensity.py --dataset rees46 --skip-temporal --ft-epochs 10 \
	  --pretrain-epochs 15 --value-buckets $$vb --methods lightgbm transformer fusion joint --tag early-vb$$vb; done
	$(BIN)/python benchmarks/propensity_ab.py --a early-vb8 --b early-vb0 --task rees46_early

# section 19 [~60 min]: next-item NDCG@10 with item side features (Taobao: category; REES46: category + brand),
# and the control with the same categories shuffled across items (must not help)
SIDES := --recipe clickstream-small --no-exclude-seen --max-minutes 90
bench-side-features: install
	$(BIN)/python benchmarks/pretrain.py --dataset taobao $(SIDES) --tag nosides --save data/models/taobao-loo-nosides
	$(BIN)/python benchmarks/pretrain.py --dataset taobao $(SIDES) --side-features category --tag category \
	  --save data/models/taobao-loo-category
	$(BIN)/python benchmarks/pretrain.py --dataset taobao $(SIDES) --side-features category --shuffle-sides \
	  --tag category-shuffled --save data/models/taobao-loo-category-shuffled
	$(BIN)/python benchmarks/pretrain.py --dataset rees46 $(SIDES) --tag nosides --save data/models/rees46-loo-nosides
	$(BIN)/python benchmarks/pretrain.py --dataset rees46 $(SIDES) --side-features category,brand \
	  --tag category-brand --save data/models/rees46-loo-sides
	$(BIN)/python benchmarks/side_features_ab.py --dataset taobao --a data/models/taobao-loo-category \
	  --b data/models/taobao-loo-nosides --no-exclude-seen
	$(BIN)/python benchmarks/side_features_ab.py --dataset rees46 --a data/models/rees46-loo-sides \
	  --b data/models/rees46-loo-nosides --no-exclude-seen

# section 5 [~4 min]: do tiers mean what they say the next day
bench-segments: install
	$(BIN)/python benchmarks/segments.py --dataset taobao

# section 6 [~6 min]: explainer grounding and fallback against a misbehaving loopback LLM
bench-explain: install
	$(BIN)/python benchmarks/explain.py --dataset instacart --users 200

# section 7 [~10 min]: the MLflow batch pipeline on Taobao with the full recipe
bench-pipeline: install
	$(BIN)/python -m pipelines.demo --recipe clickstream-small --out data/outputs/taobao

# section 8 [~10 min, after bench-pretrain-ml1m and bench-pipeline]: the API under wrk load
bench-api: install system-deps
	test -d $(ML1M_MODEL) || $(MAKE) bench-pretrain-ml1m
	$(BIN)/python benchmarks/api_load.py --model $(ML1M_MODEL)
	test -d data/outputs/taobao/model || $(MAKE) bench-pipeline
	$(BIN)/python benchmarks/api_load.py --model data/outputs/taobao/model

# section 9 [~16 min]: the notebooks top to bottom at full budget, and the dashboard test
bench-notebooks: install system-deps
	$(BIN)/python benchmarks/notebooks.py
	$(BIN)/python -m pytest tests/test_dashboard.py -v

# section 11 [<1 min]: the bad-input corpus through the Python boundary and the CLI
bench-bad-input: install
	$(BIN)/python -m pytest tests/test_bad_input.py -v

# section 13 [~4 min]: streaming prepare vs the in-memory path on synthetic S and M shops (issue 16)
bench-scale: install
	$(BIN)/python benchmarks/scale.py --size S --size M

# section 13, L [~6 min: 90 s to generate 102M events, ~3.5 min to prepare; ~5 GB of disk in data/synth/L]
bench-scale-large: install
	$(BIN)/python benchmarks/scale.py --size L --skip-in-memory

# section 14 [~30 min]: training from shards vs in memory, DDP 1 vs 2 processes, scoring from shards (S, M)
bench-scale-train: bench-scale
	$(BIN)/python benchmarks/scale_train.py --size S --steps 150 --repeats 2 --ddp --score-users 20000
	$(BIN)/python benchmarks/scale_train.py --size M --steps 100 --repeats 2 --score-users 3000

# section 14, L [~10 min after bench-scale-large]: training and scoring the 3M-user shop from its shards
bench-scale-train-large: bench-scale-large
	$(BIN)/python benchmarks/scale_train.py --size L --steps 100 --repeats 1 --score-users 3000

# section 28 [~25 min after bench-scale]: row-sparse item-table updates (SparseAdam) vs dense AdamW, interleaved:
# training tokens/s at S (96k items) and M (965k items), DDP bytes all-reduced per step at M (issue 30)
bench-sparse-train: bench-scale
	$(BIN)/python benchmarks/scale_train.py --size S --size M --steps 100 --repeats 2 --sparse off,on \
		--skip-in-memory --skip-score --ddp --ddp-size M --ddp-repeats 1 --ddp-procs 2

# section 28 [~50 min after bench-scale-large: 3 min to train, ~19 min to build the index, ~21 min to score]: all 3M users
# of the L shop over its 1M items through the cost-chosen two-stage path, recall@10 against exact ranking on
# 2,000 of them, and the scoring hot path A/B against the commit before issue 30 (AB_BASE)
# section 29 [~6 min]: the API at c=8 with --workers 2 (issue 30's targets): known ML-1M users with and without the
# rank cache, 50 raw events, Taobao's known users through the ANN index with and without it
bench-api-fast: install system-deps
	test -d $(TAOBAO_LOO) || $(BIN)/python benchmarks/pretrain.py --dataset taobao --recipe clickstream-small --no-exclude-seen --max-minutes 8 --save $(TAOBAO_LOO)
	$(BIN)/python benchmarks/api_load.py --model $(ML1M_MODEL) --kinds user,events --levels 8 --seconds 20 --serve-args "--workers 2" --name ml-1m-w2
	$(BIN)/python benchmarks/api_load.py --model $(ML1M_MODEL) --kinds user --levels 8 --seconds 20 --serve-args "--workers 2 --rank-cache 0" --name ml-1m-w2-nocache
	$(BIN)/python benchmarks/api_load.py --model $(TAOBAO_LOO) --kinds user --levels 8 --seconds 20 --serve-args "--workers 2" --name taobao-w2
	$(BIN)/python benchmarks/api_load.py --model $(TAOBAO_LOO) --kinds user --levels 8 --seconds 20 --serve-args "--workers 2 --rank-cache 0" --name taobao-w2-nocache

# section 29 [~45 min]: the same four API paths, interleaved A/B against the commit before the rank cache (API_BASE, a worktree)
API_BASE ?= ../base
bench-api-ab: install system-deps
	$(BIN)/python benchmarks/ab_compare.py api --base $(API_BASE) --model $(ML1M_MODEL) --rounds 4 --seconds 15 --serve-args "--workers 2" --tag ml1m_user_w2
	$(BIN)/python benchmarks/ab_compare.py api --base $(API_BASE) --model $(ML1M_MODEL) --rounds 4 --seconds 15 --serve-args "--workers 2" --this-args "--rank-cache 0" --tag ml1m_user_w2_nocache
	$(BIN)/python benchmarks/ab_compare.py api --base $(API_BASE) --model $(ML1M_MODEL) --rounds 4 --seconds 15 --serve-args "--workers 2" --kind events --tag ml1m_events_w2
	$(BIN)/python benchmarks/ab_compare.py api --base $(API_BASE) --model $(TAOBAO_LOO) --rounds 4 --seconds 15 --serve-args "--workers 2" --tag taobao_user_w2
	$(BIN)/python benchmarks/ab_compare.py api --base $(API_BASE) --model $(TAOBAO_LOO) --rounds 4 --seconds 15 --serve-args "--workers 2" --this-args "--rank-cache 0" --tag taobao_user_w2_nocache

AB_BASE ?= 74a5c4e
bench-score-scale: bench-scale-large
	$(BIN)/python benchmarks/score_scale.py --size L --model data/models/synth-L --sample 2000 \
		--ab-base $(AB_BASE) --ab-users 20000 --ab-rounds 2

# section 15 [~10 min]: one new day by fit_partial vs a full retrain, Taobao, leak-free time cut
bench-incremental: install
	$(BIN)/python benchmarks/incremental.py

# section 16 [~40 min: trains the 1M-item synthetic model once, ~15 min]: ANN libraries and two-stage retrieval vs exact
SYNTH_1M := data/synth/1M/raw
TAOBAO_LOO := data/models/taobao-loo
bench-retrieval: install
	test -d $(SYNTH_1M) || $(BIN)/python ../shared/tools/synth_clickstream.py --out $(SYNTH_1M) --users 300000 --items 1000000 --seed 0
	test -d data/models/synth-1m-loo || $(BIN)/python benchmarks/retrieval.py --synthetic $(SYNTH_1M) --model data/models/synth-1m-loo --train-only --max-steps 300
	$(BIN)/python benchmarks/retrieval.py --synthetic $(SYNTH_1M) --model data/models/synth-1m-loo --users 1000
	test -d $(TAOBAO_LOO) || $(BIN)/python benchmarks/pretrain.py --dataset taobao --recipe clickstream-small --no-exclude-seen --max-minutes 8 --save $(TAOBAO_LOO)
	$(BIN)/python benchmarks/retrieval.py --model $(TAOBAO_LOO) --dataset taobao --users 814
	$(BIN)/python benchmarks/retrieval.py --model $(ML1M_MODEL) --dataset ml-1m --users 500 --skip-libraries

# section 17 [~8 min, after bench-pretrain-ml1m]: batch scoring on torch / torch int8 / onnxruntime fp32 / int8
bench-engines: data
	test -d $(ML1M_MODEL) || $(MAKE) bench-pretrain-ml1m
	$(BIN)/python benchmarks/engines.py --model $(ML1M_MODEL) --dataset ml-1m --rounds 2

# section 18 [~15 min, after bench-retrieval and bench-engines]: the API at production shape (raw events,
# ANN, ONNX, 1M items, workers, a hot reload under load)
bench-api-production: install system-deps
	$(BIN)/python benchmarks/api_load.py --model $(ML1M_MODEL) --kinds user,events,unknown --levels 8 --seconds 20 --reload
	$(BIN)/python benchmarks/api_load.py --model $(ML1M_MODEL) --kinds user,events --levels 8 --seconds 20 --serve-args "--engine onnx" --name ml-1m-onnx
	$(BIN)/python benchmarks/api_load.py --model $(ML1M_MODEL) --kinds user --levels 8 --seconds 20 --serve-args "--workers 2" --name ml-1m-2workers
	$(BIN)/python benchmarks/api_load.py --model $(TAOBAO_LOO) --kinds user,events --levels 8 --seconds 20 --name taobao-ann
	$(BIN)/python benchmarks/api_load.py --model $(TAOBAO_LOO) --kinds user --levels 8 --seconds 20 --serve-args "--retrieval exact" --name taobao-exact
	$(BIN)/python benchmarks/api_load.py --model data/models/synth-1m-loo --kinds user,events --levels 8 --seconds 20 --name synth-1m
	$(BIN)/python benchmarks/api_load.py --model $(ML1M_MODEL) --kinds events,unknown --levels 8 --seconds 20 --serve-args "--workers 2" --name ml-1m-2workers-events
	$(BIN)/python benchmarks/api_load.py --model $(TAOBAO_LOO) --kinds user,events --levels 8 --seconds 20 --serve-args "--workers 2" --name taobao-ann-2workers
	$(BIN)/python benchmarks/api_load.py --model data/models/synth-1m-loo --kinds user,events --levels 8 --seconds 20 --serve-args "--workers 2" --name synth-1m-2workers

# section 10 [~20 min]: A/B against another checkout (git worktree add ../base COMMIT), interleaved:
#   make bench-ab BASE=../base MODEL=data/models/ml-1m-loo
bench-ab: data
	$(BIN)/python benchmarks/ab_compare.py train --base $(BASE) --epochs 2
	$(BIN)/python benchmarks/ab_compare.py score --base $(BASE) --model $(MODEL) --rounds 5
	$(BIN)/python benchmarks/ab_compare.py api --base $(BASE) --model $(MODEL) --rounds 5 --seconds 15

serve: install-app
	$(BIN)/behaviorlm serve --model models:/behaviorlm@champion --segments data/outputs/segments

# the segment dashboard over data/outputs (BEHAVIORLM_OUTPUTS to change), at http://127.0.0.1:8501
dashboard: install-app
	$(BIN)/behaviorlm dashboard

mlflow-ui: install-app
	$(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/data/mlflow/mlflow.db} --port 5000

LINTED := behaviorlm tests benchmarks pipelines dashboards docs
# ruff lint + format check, and the type checker over the library (0 errors; config in pyproject.toml)
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

typecheck: install
	$(BIN)/mypy

# the docs site (MkDocs Material + mkdocstrings) at http://127.0.0.1:8001; docs-build is CI's --strict check
docs: install
	$(BIN)/mkdocs serve -a 127.0.0.1:8001

docs-build: install
	$(BIN)/mkdocs build --strict --site-dir data/site

clean:
	rm -rf $(VENV) build .pytest_cache

# section 20 [~50 min]: the repeat-aware model against recent / repeat / session-kNN / item-kNN /
# co-occurrence / popularity on five clickstreams (Taobao, REES46, Tmall, RetailRocket, Taobao-31k)
bench-clickstream: install
	$(BIN)/python benchmarks/clickstream.py

# section 20 [~30 min]: the mechanism where it cannot help (ML-1M, seen items excluded), beside section 1
bench-clickstream-ml1m: data
	$(BIN)/python benchmarks/pretrain.py --dataset ml-1m --epochs 30 --dropout 0.1 --copy-head on --tag copy \
	  --save data/models/ml-1m-loo-copy

# section 20 [~15 min]: its cost, interleaved A/B against the plain model on Taobao (training,
# batch scoring, the API with known users and 50 raw events)
bench-clickstream-cost: install system-deps
	$(BIN)/python benchmarks/clickstream_cost.py --api

# section 22 [~3 min]: the served model equals the day's batch scores for every Taobao user
bench-served-vs-batch: install
	$(BIN)/python benchmarks/served_vs_batch.py

# section 24 [~2 min]: integrated gradients, this project's implementation vs Captum's (installed for the measurement only)
bench-ig-captum: install
	test -d $(ML1M_MODEL) || $(MAKE) bench-pretrain-ml1m
	$(BIN)/pip install -q captum
	$(BIN)/python benchmarks/ig_vs_captum.py --model $(ML1M_MODEL) --dataset ml-1m
	$(BIN)/pip uninstall -y -q captum

# sections 23-24 [~7 min, plus bench-pretrain-ml1m if its model is missing]: faithfulness of occlusion attributions (top-k deletion, deletion/insertion AUC, gradient / attention / recency baselines), grounded rationales and their cost on the Taobao sample (seen items kept and excluded) and ML-1M (issue 28)
bench-attribution: install
	$(BIN)/python benchmarks/attribution.py
	$(BIN)/python benchmarks/attribution.py --exclude-seen
	test -d $(ML1M_MODEL) || $(MAKE) bench-pretrain-ml1m
	$(BIN)/python benchmarks/attribution.py --dataset ml-1m --model $(ML1M_MODEL) --users 200

# section 25 [~45 min; base models kept in data/models]: purchase-target fine-tuning (SFT control, DPO with window / top-K / mixed negatives, S-DPO, GRPO) against the shop's rules on RetailRocket, Taobao-31k and the Taobao / REES46 samples (issue 27)
bench-finetune: install
	$(BIN)/python benchmarks/finetune.py
	$(BIN)/python benchmarks/finetune.py --dataset taobao --dataset rees46 --tag samples

# section 25 [~12 min]: LoRA adapters per segment against base, base + segment token and a fully fine-tuned copy; adapter size and serving latency with and without one (RetailRocket)
bench-adapters: install
	$(BIN)/python benchmarks/adapters.py
	$(BIN)/python benchmarks/adapters.py --latency-only --rounds 30
