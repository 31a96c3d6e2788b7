# make test / make demo work on a fresh CPU-only machine: they build .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kiln-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install test test-gpu demo clean

install: $(STAMP)

# Without a GPU, torch 2.13.0 (the CPU build on local disk) goes in first, so nothing pulls a CUDA
# build. With one, the venv sees the machine's own CUDA torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(if $(HAS_GPU),--system-site-packages) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(HAS_GPU),,$(PY) -m pip install -q torch==2.13.0)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=10 tests

# GPU tests in GPU_WORKERS processes sharing the GPU (0: one process): the slowest compile every config of a kernel,
# and Triton compiles on one CPU core, so four took the suite from ~31 to ~13 minutes on an H100 (bench/NOTES.md, session 50)
GPU_WORKERS ?= 4
test-gpu: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m pytest -q -m gpu $(if $(filter 0,$(GPU_WORKERS)),,-n $(GPU_WORKERS)) tests

demo: $(STAMP)
	@mkdir -p out
	$(VENV)/bin/kiln compile --model llama-tiny -o out/llama-tiny.kiln --force --verify --report
	$(VENV)/bin/kiln run out/llama-tiny.kiln --dim batch=2 --dim seq=24
	$(VENV)/bin/kiln inspect out/llama-tiny.kiln
	$(VENV)/bin/kiln compile --model dit-tiny -o out/dit-tiny.kiln --force --verify --report
	$(VENV)/bin/kiln run out/dit-tiny.kiln --dim batch=4
	$(VENV)/bin/kiln compile --model llama-tiny --generate --max-seq 128 -o out/llama-tiny-gen.kiln --force
	$(VENV)/bin/kiln generate out/llama-tiny-gen.kiln --ids 1,2,3 --ids 7,8 --max-new-tokens 16
	$(VENV)/bin/kiln compile --model dit-tiny --pipeline -o out/dit-tiny-pipe.kiln --force
	$(VENV)/bin/kiln sample out/dit-tiny-pipe.kiln --class 3 --steps 25 --guidance 4 --seed 0 -o out/dit-tiny.png --force

clean:
	rm -rf $(VENV) out .pytest_cache
