# rotalibi front door. `make train` and `make test` work on a fresh machine: every target
# depends on `setup`, which builds .venv once (a stamp file makes later runs instant).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/tiny.yaml
ARGS ?=

.PHONY: setup test data train plan eval compare lm-eval generate study ablation tensorboard slurm slurm-array bench-attention bench-attention-cpu bench-attention-cost gpu-check check-gpu-compile lint format clean-venv

setup: $(STAMP)

# torch first (deepspeed's setup.py imports it), then deepspeed without its C++ ops (they
# JIT-compile on first use), then the project itself in editable mode with the dev tools.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "rotalibi needs Python >= 3.11; set PYTHON=/path/to/python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "torch>=2.6"
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation "deepspeed>=0.16"
	$(PY) -m pip install --quiet -e ".[dev,eval,trackers]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest

# The default corpus (the interpreter's stdlib sources) as data/default; a no-op when up to date.
data: setup
	$(PY) -m data.default_corpus --output data/default

# Train CONFIG (default: the tiny CPU config on the default corpus); ARGS: key=value overrides.
train: setup data
	$(PY) -m launch.train $(CONFIG) $(ARGS)

# Memory and throughput plan of CONFIG before it is queued (ARGS: key=value overrides, --gpus N,
# --device cpu, --mfu 0.4, --peak-tflops T). README "Planning".
plan: setup
	$(PY) -m launch.plan $(CONFIG) $(ARGS)

# Extrapolation evaluation of RUN (a run, checkpoint or export; default runs/tiny, its newest
# checkpoint); ARGS: key=value overrides, --step N, --all, --out DIR. README "Evaluation".
RUN ?= runs/tiny
eval: setup
	$(PY) -m launch.evaluate $(RUN) $(ARGS)

# lm-evaluation-harness on RUN's newest checkpoint (exported for Hugging Face first): TASKS,
# comma-separated (default: the offline local task); ARGS: --limit N, --step N, --max-length L.
# Results in RUN/eval/lm_eval/ and RUN/tb. README "Hugging Face, generation and lm-eval".
TASKS ?= rotalibi_heldout
lm-eval: setup
	$(PY) -m launch.lm_eval $(RUN) --tasks $(TASKS) $(ARGS)

# Sample text from RUN's newest checkpoint: PROMPT, byte for byte, ARGS: --max-new-tokens N,
# --temperature T, --top-p P, --seed S. The prompt is never parsed: make does not expand it
# ($(value ...); PROMPT itself is not exported, which would expand it) and the shell reads it
# from the environment. Make drops the leading blanks of a PROMPT given on its command line:
# give such a prompt in the environment (PROMPT='  x' make generate).
PROMPT ?= def
unexport PROMPT
generate: export ROTALIBI_PROMPT = $(value PROMPT)
generate: setup
	$(PY) -m launch.generate $(RUN) --prompt "$$ROTALIBI_PROMPT" $(ARGS)

# One plot and one table comparing the newest evaluations of RUNS (run directories).
compare: setup
	$(PY) -m launch.compare $(RUNS) $(ARGS)

# The extrapolation study (docs/study.md): every configs/study run (1 to 2.5 hours on 2 CPU
# cores; finished runs are skipped), then docs/study/{results.md,summary.json,ppl_vs_length.png}.
study: setup data
	$(PY) -m launch.study configs/study --out docs/study

# The ablation of the hybrid (docs/ablation.md): every configs/ablation run (24 runs, several
# hours on 2 CPU cores; a finished run is skipped, also in a later checkout through its record
# docs/ablation/records/<name>.json, and an interrupted one resumes), then
# docs/ablation/{results.md,summary.json,ppl_vs_length.png} and the verdicts in docs/ablation.md.
ablation: setup data
	$(PY) -m launch.study configs/ablation --out docs/ablation
	$(PY) -m launch.ablation

# TensorBoard over every run in runs/ (PORT=6006).
PORT ?= 6006
tensorboard: setup
	$(VENV)/bin/tensorboard --logdir runs --port $(PORT)

# Submit CONFIG as a SLURM training job (ARGS: key=value overrides, --dry-run); README "SLURM".
slurm: setup
	$(PY) -m launch.slurm $(CONFIG) $(ARGS)

# Submit CONFIGS (a glob, e.g. CONFIGS="configs/study_gpu/*.yaml"; base.yaml files, the configs'
# shared base, left out as launch.study does) as one SLURM job array, a task per config.
slurm-array: setup
	$(PY) -m launch.slurm --array $(filter-out %/base.yaml,$(wildcard $(CONFIGS))) $(ARGS)

# Fused attention (with and without ALiBi skipping) against SDPA-flash, FlashAttention-2 and
# FlexAttention: speed and memory (CUDA only; ARGS: e.g.
# --lengths 8192 --head-dims 128). Writes bench/results/attention-<device>-<time>.json.
bench-attention: setup
	$(PY) -m bench.attention $(ARGS)

# The CPU attention path against SDPA with the ALiBi mask, with and without ALiBi skipping
# (T = 4096, 8192), into bench/results/attention_cpu_<machine>.json. Run it on an idle machine.
bench-attention-cpu: setup
	$(PY) -m bench.attention_cpu $(ARGS)

# The fused kernel's matmul FLOPs and HBM bytes per pass next to FlashAttention-2's, from a
# documented model (no GPU needed), into bench/results/attention_cost.json.
bench-attention-cost: setup
	$(PY) -m bench.attention_cost $(ARGS)

# On a CUDA machine, within 8 minutes (ARGS=--quick: 4): the compiled kernel tests in parallel,
# bench-attention at 8k-32k, PaTH against the reference, bitwise determinism and 20 training
# steps of configs/125m.yaml, into bench/results/gpu_check-<device>-<time>.json (ARGS: --quick,
# --autotune).
gpu-check: setup
	$(PY) -m bench.gpu_check $(ARGS)

# Every Triton kernel launch the schemes reach, traced and compiled for sm_80 and sm_90 with the
# JIT's own specialization on this machine (no GPU needed): fails on a compile error, shared
# memory over the target's limit or the pruning's estimate, or register spills (ARGS: --subset,
# --main-flags, --dtype, --head-dim, --heads, --out FILE).
check-gpu-compile: setup
	$(PY) -m bench.compile_gate $(ARGS)

# ruff, then the import layers (pyproject.toml's [tool.importlinter]: launch > evaluation >
# training > model > data | kernels); an upward import fails naming it.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
