# GainLoRA experiment framework. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXP ?= demo
ARGS ?=
GAINLORA_DATA ?= data/CL_Benchmark
export GAINLORA_DATA
STAMP := $(VENV)/.installed

.PHONY: help list setup run test data bench gpu-check report clean sweep agent demo-table predict

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

# Each name with the first line of its file's comment; reads the files only (no virtualenv needed).
list: ## the named experiments (EXP=...) and the methods (ARGS="method=...")
	@echo "experiments: make run EXP=<name>"
	@for f in experiments/*.yaml; do printf "  %-31s %s\n" "$$(basename $$f .yaml)" "$$(grep -m1 '^# [^@]' $$f | cut -c3-88)"; done
	@echo "methods: make run ARGS=\"method=<name>\""
	@for f in conf/method/*.yaml; do printf "  %-31s %s\n" "$$(basename $$f .yaml)" "$$(grep -m1 '^# ' $$f | cut -c3-88)"; done

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# The constraint keeps every install path, build environments included, on torch==2.13.0.
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt DS_BUILD_OPS=0 $(VENV)/bin/pip install -q -e ".[dev,deepspeed,hf]"
	touch $(STAMP)

setup: $(STAMP) ## create the virtualenv and install the pinned dependencies

run: $(STAMP) ## run an experiment: make run [EXP=demo] [ARGS="key=value ..."]
	$(PY) -m gainlora.run experiment=$(EXP) $(ARGS)

test: $(STAMP) ## run the test suite (CPU; GPU tests skip without CUDA), ends with skip counts by reason; ARGS="-k name" for pytest
	$(PY) -m pytest -q $(ARGS)

data: $(STAMP) ## download the CL benchmark into GAINLORA_DATA (default data/CL_Benchmark), checking every file's hash
	$(PY) -m gainlora.data.download --dest $(GAINLORA_DATA)

report: $(STAMP) ## compare runs into reports/<name>/: make report RUNS="runs/demo/a runs/demo/b" [NAME=lr]
	$(PY) -m gainlora.report $(RUNS) $(if $(NAME),--name $(NAME))

COUNT ?= 1
sweep: $(STAMP) ## create a W&B sweep: make sweep SWEEP=sweeps/demo_lr.yaml
	$(VENV)/bin/wandb sweep $(SWEEP)

agent: $(STAMP) ## run sweep trials: make agent ID=entity/project/sweep_id [COUNT=1]
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/wandb agent --count $(COUNT) $(ID)

bench: $(STAMP) ## speed and memory of the fused gated branches (prints a table, writes JSON)
	$(PY) bench/run_bench.py --out bench/results/bench.json

gpu-check: $(STAMP) ## the GPU checks (bf16 bench at T5-Large/Llama-7B shapes, runs, ZeRO): one JSON; skips without CUDA
	$(PY) bench/gpu_check.py --out bench/results/gpu_check.json

DEMO_METHODS := seqlora inclora olora inflora ewc clora migu tasl kiflora epi l2p lfpt5 seqlora_replay inclora_replay sapt_lora gainlora_inclora gainlora_clora gainlora_olora gainlora_inflora
demo-table: $(STAMP) ## the README's method comparison on the demo: every method of DEMO_METHODS, then a report
	for m in $(DEMO_METHODS); do $(PY) -m gainlora.run experiment=demo method=$$m run_id=table-$$m $(ARGS) || exit 1; done
	$(PY) -m gainlora.report $(addprefix runs/demo/table-,$(DEMO_METHODS)) --out reports/demo

clean: ## remove caches and build leftovers (keeps runs/ and the virtualenv)
	rm -rf .pytest_cache src/*.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

predict: $(STAMP) ## batch inference: make predict RUN=runs/demo/<id> INPUT=in.jsonl OUT=out.jsonl [ARGS="--batch-size 64"]
	$(PY) -m gainlora.predict $(if $(RUN),"$(RUN)") $(if $(INPUT),"$(INPUT)") $(if $(OUT),"$(OUT)") $(ARGS)
