# make demo: create .venv, install, run the main job.
# make test: create .venv, install, run the test suite (the newest torch and Triton claimed).
# make test-oldest: the same in .venv-oldest with the oldest pair claimed (the GPU machine's).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch 2.13.0 is a CPU build these machines hold on local disk; 2.11.0 comes from PyPI.
TORCH  ?= torch==2.13.0
TRITON ?= triton==3.9.0

.PHONY: demo test test-oldest bench gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt '$(TORCH)' '$(TRITON)' -e '.[dev]'
	$(PY) -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-oldest:
	$(MAKE) test VENV=.venv-oldest TORCH=torch==2.11.0 TRITON=triton==3.6.0

# make bench: pytest-benchmark tables (CPU), JSON in benchmarks/results/; then the ratio table;
# then the other libraries' CPU optimizers (the bench extra: DeepSpeed, bitsandbytes).
bench: $(STAMP)
	$(PY) -m pytest benchmarks/test_bench_cpu.py -q --benchmark-only \
		--benchmark-columns=median,iqr,rounds --benchmark-json=benchmarks/results/cpu-bench.json
	$(PY) -m benchmarks.bench --json benchmarks/results/cpu-ratios.json
	$(PY) -m benchmarks.bench --optimizers all --cases 1000x64 400x4K demo-cnn \
		--modes fresh-step --variants fastopt --repeats 21 \
		--json benchmarks/results/cpu-every-optimizer.json > benchmarks/results/cpu-every-optimizer.txt
	cat benchmarks/results/cpu-every-optimizer.txt
	$(PY) -m benchmarks.muon_bench --repeats 21 --json benchmarks/results/cpu-muon.json \
		| tee benchmarks/results/cpu-muon.txt
	$(PY) -m benchmarks.step_floor
	$(PY) -m benchmarks.lean_cpu --json benchmarks/results/cpu-lean.json \
		| tee benchmarks/results/cpu-lean.md
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	$(PY) -m benchmarks.peers --json benchmarks/results/cpu-peers.json \
		| tee benchmarks/results/cpu-peers.md

# gpu-check: the GPU tests and microbenchmark (needs CUDA); see benchmarks/gpu_check.sh.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf .venv .venv-oldest *.egg-info .pytest_cache .hypothesis
