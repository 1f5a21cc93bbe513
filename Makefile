# hvd_qpr developer tasks. Everything runs from the project's virtual environment (.venv),
# which `make install` (scripts/install.sh) creates and keeps up to date.

VENV ?= .venv
PY := $(VENV)/bin/python
RUFF := $(VENV)/bin/ruff
CLANG_FORMAT := $(VENV)/bin/clang-format
HADOLINT := $(VENV)/bin/hadolint

# Sources to lint, those of them that exist.
PY_SRC := $(wildcard hvd_qpr tests benchmarks examples setup.py)
CXX_SRC := $(sort $(shell find csrc tests/native -type f \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' \
	-o -name '*.cuh' -o -name '*.inc' \) 2>/dev/null))

.PHONY: install test lint format bench bench-net demo clean

install:
	HVD_QPR_VENV=$(VENV) bash scripts/install.sh

test: install
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q tests

lint:
	@test -x $(RUFF) -a -x $(CLANG_FORMAT) -a -x $(HADOLINT) || \
		{ echo "run 'make install' first" >&2; exit 1; }
	$(HADOLINT) --failure-threshold info Dockerfile
ifneq ($(PY_SRC),)
	$(RUFF) check $(PY_SRC)
	$(RUFF) format --check $(PY_SRC)
endif
ifneq ($(CXX_SRC),)
	$(CLANG_FORMAT) --dry-run --Werror $(CXX_SRC)
endif

format:
	@test -x $(RUFF) -a -x $(CLANG_FORMAT) || { echo "run 'make install' first" >&2; exit 1; }
ifneq ($(PY_SRC),)
	$(RUFF) check --fix $(PY_SRC)
	$(RUFF) format $(PY_SRC)
endif
ifneq ($(CXX_SRC),)
	$(CLANG_FORMAT) -i $(CXX_SRC)
endif

bench: install
	$(PY) benchmarks/kernels.py --device cpu --threads 1 2 --json benchmarks/results/kernels_cpu.json
	$(PY) benchmarks/elias_sizes.py --json benchmarks/results/elias_sizes.json

# The bandwidth-limited cluster (root: network namespaces and tc), about 45 minutes on 2 cores,
# then the scale model; both write into benchmarks/results and benchmarks/RESULTS.md.
bench-net: install
	$(PY) benchmarks/netsim.py --workers 4 --bandwidth-mbit 100
	$(PY) benchmarks/netsim.py --workers 4 --bandwidth-mbit 1000
	$(PY) benchmarks/netsim.py --workers 4 --bandwidth-mbit 10 --time-budget 100 --methods \
		parallel-sgd fp16 pr-sgd qpr-4bit-auto qpr-4bit-elias qpr-2bit-scatter-gather \
		qpr-2bit-allgather qpr-2bit-elias
	$(PY) benchmarks/netsim.py --workers 4 --bandwidth-mbit 100 --eval-every 32 --tag ksweep \
		--methods parallel-sgd pr-sgd@8 pr-sgd@16 pr-sgd@32 qpr-2bit-elias@16 qpr-2bit-elias@32 \
		qpr-4bit-elias@32 qpr-2bit-scatter-gather@32
	$(PY) benchmarks/netsim.py --workers 2 --bandwidth-mbit 100 --epochs 15 --methods \
		parallel-sgd pr-sgd qpr-4bit-auto qpr-2bit-scatter-gather qpr-2bit-elias
	$(PY) benchmarks/netsim.py --workers 4 --bandwidth-mbit 100 --tag sparse \
		--baseline benchmarks/results/netsim_digits_100mbit_4w.json --methods gtopk-ef-0.001 \
		topk-ef-0.001 gtopk-ef topk-ef adaptive-topk-ef terngrad-pr efsign-ef-pr
	$(PY) benchmarks/netsim.py --workers 4 --bandwidth-mbit 100 --tag sparse-warm \
		--baseline benchmarks/results/netsim_digits_100mbit_4w.json --methods \
		gtopk-ef-0.001-warm topk-ef-0.001-warm
	$(PY) benchmarks/netsim.py --workers 4 --bandwidth-mbit 100 --tag paradigms \
		--baseline benchmarks/results/netsim_digits_100mbit_4w.json --methods gossip-ring-4bit \
		gossip-ring-4bit-naive gossip-exp-4bit gossip-exp-4bit-naive gossip-ring-2bit \
		gossip-ring-2bit-naive gossip-exp-2bit gossip-exp-2bit-naive gossip-ring-4bit@1 \
		gossip-ring-4bit-naive@1 overlap-pr overlap-4bit qpr-4bit-auto overlap-4bit-elias \
		qpr-4bit-elias
	$(PY) benchmarks/netsim.py --workers 4 --bandwidth-mbit 100 --tag overlap-k4 \
		--baseline benchmarks/results/netsim_digits_100mbit_4w.json --local-steps 4 \
		--pr-local-steps 4 --methods pr-sgd@4 overlap-pr qpr-4bit-elias overlap-4bit-elias
	$(PY) benchmarks/scale_model.py --tag digits --results-md benchmarks/RESULTS.md
	$(PY) benchmarks/scale_model.py --tag resnet50size --title "a ResNet-50-sized workload" \
		--netsim none --parameters 25557032 --compute-ms 100 --dataset-steps 40037 \
		--results-md benchmarks/RESULTS.md

demo: install
	$(PY) examples/demo.py

# Removes build outputs and caches; keeps .venv (remove it by hand for a from-scratch install).
clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find hvd_qpr -name '*.so' -delete 2>/dev/null || true
	find . \( -path ./.venv -o -path ./.git \) -prune -o -name __pycache__ -type d -print0 \
		| xargs -0 -r rm -rf
	rm -f $(VENV)/.hvd_qpr/build.sha256
