# make demo: create .venv, install, run the main job.
# make test: create .venv, install, run the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo

test: $(STAMP)
	$(PY) -m pytest -q

# make bench: pytest-benchmark tables (CPU), JSON in benchmarks/results/; then the ratio table.
bench: $(STAMP)
	$(PY) -m pytest benchmarks/test_bench_cpu.py -q --benchmark-only \
		--benchmark-columns=median,iqr,rounds --benchmark-json=benchmarks/results/cpu-bench.json
	$(PY) -m benchmarks.bench --json benchmarks/results/cpu-ratios.json
	$(PY) -m benchmarks.bench --optimizers all --cases 1000x64 400x4K demo-cnn \
		--modes fresh-step --variants fastopt --repeats 15 \
		--json benchmarks/results/cpu-every-optimizer.json

# gpu-check: the GPU tests and microbenchmark (needs CUDA); see benchmarks/gpu_check.sh.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
