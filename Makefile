# dws -- the two commands a newcomer needs are `make demo` and `make test`; both set everything up themselves.
SHELL := /bin/bash
VENV  := .venv
SPACES := rollout trainer env
PYTEST_FLAGS ?= -q
# Where `make demo` keeps its bucket and tiny model (ignored by git). Override BUCKET/MODEL to use the Hub.
DEMO_DIR ?= .dws/demo
BUCKET ?=
MODEL ?=

.PHONY: help venvs test test-shared test-rollout test-trainer test-env test-e2e test-reliability demo bench spaces lint clean $(addprefix venv-,$(SPACES))

help:
	@echo "make demo   - run the whole system locally (tiny model, local-folder bucket)"
	@echo "make test   - build the per-Space venvs if needed and run every test suite"
	@echo "make bench  - payload / encode / pause benchmarks (results in bench/*.json, plot bench/results.png)"
	@echo "make spaces - deploy the three Hugging Face Spaces (needs HF_TOKEN)"

$(addprefix venv-,$(SPACES)): venv-%:
	@tools/mkvenv.sh $*

venvs: $(addprefix venv-,$(SPACES))

# A suite runs only where its folder exists: an absent suite is skipped here, while a present one that collects
# nothing still fails (pytest exits 5), as CI requires.
define run_suite
	@if [ -d tests/$(2) ]; then echo "== tests/$(2) in $(VENV)/$(1)"; $(VENV)/$(1)/bin/python -m pytest $(PYTEST_FLAGS) tests/$(2); fi
endef

# tests/shared also runs each Space's entrypoint `--help` and lock check through that Space's own venv.
test-shared: venv-trainer venv-rollout venv-env
	$(call run_suite,trainer,shared)
	$(call run_suite,rollout,shared)

test-rollout: venv-rollout
	$(call run_suite,rollout,rollout)

# The dashboard check runs in a real headless Chromium: installed here when missing, never skipped.
test-trainer: venv-trainer
	@tools/need-browser.sh
	$(call run_suite,trainer,trainer)

test-env: venv-env
	$(call run_suite,env,env)

test-e2e: venvs
	$(call run_suite,trainer,e2e)

# Faults, hostile input, load and secrets: the suite runs in the rollout venv; the env Space and the trainer it
# also starts run from their own venvs.
test-reliability: venvs
	$(call run_suite,rollout,reliability)

test: test-shared test-env test-rollout test-trainer test-e2e test-reliability

# The three services from their own venvs on 127.0.0.1 (DEMO_FLAGS: e.g. --steps 80 --port-base 8860 --exit-when-done).
demo: venvs
	@$(VENV)/trainer/bin/python -m dws_tools.demo --dir $(DEMO_DIR) $(if $(BUCKET),--bucket $(BUCKET)) $(if $(MODEL),--model $(MODEL)) $(DEMO_FLAGS)

# Payload/encode/decode on a Qwen3-0.6B-shaped model (trainer venv), then the replica half: pause, apply, latency
# and memory through a real gateway + vLLM (rollout venv), 41.6 M and 0.6B-shaped models side by side; then the
# sharded publisher at 1 vs 2 ranks and its restarts (bench/sharded*.json).
bench: venv-trainer venv-rollout
	@$(VENV)/trainer/bin/python bench/run.py $(BENCH_FLAGS)
	@$(VENV)/rollout/bin/python bench/replica.py --sizes small,0.6b --out-dir bench
	@$(VENV)/trainer/bin/python bench/sharded.py
	@$(VENV)/trainer/bin/python bench/sharded.py --restart

# The bucket and the three Hugging Face Spaces under a namespace (dws_tools/spaces.py); needs HF_TOKEN unless
# SPACES_FLAGS holds --dry-run. Example: make spaces SPACES_FLAGS="--namespace me --replicas 2 --dry-run"
spaces: venv-trainer
	@$(VENV)/trainer/bin/dws spaces deploy $(SPACES_FLAGS)

clean:
	rm -rf .dws .pytest_cache
