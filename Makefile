# One command each, on a fresh machine: `make test` (set up + tests), `make demo` (the main job on tiny models),
# `make parity` (converters + loaders + forward against the original LAVIS / BLIP code, in its own venv).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
DEMO_OUT ?= demo-out
# The original code's environment (tests/parity/reference_recipe.txt), rebuilt whenever the recipe changes.
PARITY_ENV ?= .parity-env

# `make lock` re-resolves requirements-lock.txt with uv: torch pinned by requirements-torch.txt, its CUDA-only
# dependencies left out (a CPU install has none; on a GPU node torch's own metadata pins them).
UV_VERSION := 0.13.9
LOCK_FLAGS := pyproject.toml --extra test --constraint requirements-torch.txt --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" --quiet

.PHONY: setup test test-numerics lint demo demo-zoo clean chromium lock parity

$(VENV)/.installed: pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch on this machine; a plain `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# Exactly the versions CI tests, then the project itself (its setuptools editable-mode notice silenced).
	$(PY) -m pip install -q -r requirements-lock.txt
	PYTHONWARNINGS="ignore:::setuptools.command.editable_wheel" $(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $@

lock: $(VENV)/.installed
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip compile $(LOCK_FLAGS) -o requirements-lock.txt \
		$$($(VENV)/bin/uv pip compile $(LOCK_FLAGS) | grep -oE '^(nvidia-|cuda-|triton)[^=]*' | sed 's/^/--no-emit-package /')

setup: $(VENV)/.installed chromium

# The report test renders the page in headless Chromium (Debian package), installed when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

lint: setup
	$(VENV)/bin/ruff check .

# TEST_JOBS pytest workers (pytest-xdist); tests sharing a module fixture stay on one worker (tests/conftest.py).
# Most of the suite's time is job subprocesses and Ray waiting on each other, so 2 workers pay even on 2 cores.
TEST_JOBS ?= 2
# The project's modules compiled once: the tests start hundreds of job, actor and Ray worker processes, and where
# PYTHONDONTWRITEBYTECODE is set each would compile them again. The slowest tests are listed at the end.
# Torch on one thread per process unless OMP_NUM_THREADS says otherwise: the TEST_JOBS workers and their jobs already
# fill the cores, and on 2 cores the suite took 716 s on one thread against 776-816 s on two (oversubscribed).
test: export OMP_NUM_THREADS ?= 1
test: setup
	$(PY) -m compileall -q pipeline jobs actors schemas benchmarks tests >/dev/null
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadgroup --durations=15

# The numerically sensitive tests (marker `numerics`) on torch's other CPU kernel paths, as other CPUs run them
# (docs/REPRODUCIBILITY.md): each leg is ATEN_CPU_CAPABILITY (native: unset) and OMP_NUM_THREADS. Legs are
# separate processes: NUMERICS_JOBS of them run at once (each leg's output is printed whole when it ends).
NUMERICS_LEGS ?= native:1 native:2 avx2:1 avx2:2 default:1 default:2
NUMERICS_JOBS ?= 1
test-numerics: setup
	@printf '%s\n' $(NUMERICS_LEGS) | xargs -P $(NUMERICS_JOBS) -I{} sh -c 'leg={}; cap=$${leg%%:*}; t=$${leg##*:}; \
		if [ "$$cap" = native ]; then kernels="-u ATEN_CPU_CAPABILITY"; else kernels="ATEN_CPU_CAPABILITY=$$cap"; fi; \
		out=$$(env $$kernels OMP_NUM_THREADS=$$t $(PY) -m pytest -q -m numerics -p no:cacheprovider $(NUMERICS_ARGS) 2>&1); \
		rc=$$?; printf "numerics: ATEN_CPU_CAPABILITY=%s OMP_NUM_THREADS=%s\n%s\n" "$$cap" "$$t" "$$out"; exit $$rc'

parity: setup
	$(PY) tests/parity/reference_env.py $(PARITY_ENV)
	REFEREE_SYNTH_PARITY=1 REFEREE_SYNTH_PARITY_ENV=$(PARITY_ENV) $(PY) -m pytest -q tests/parity

demo: setup
	$(PY) jobs/prompts.py --output $(DEMO_OUT)/prompts.parquet data/t2i-compbench/color_val.txt --limit 8
	$(PY) jobs/synthesize.py --prompts $(DEMO_OUT)/prompts.parquet --output $(DEMO_OUT)/run --config configs/tiny.yaml --num-actors 2
	@echo "shards are in $(DEMO_OUT)/run/shards (WebDataset tars + Parquet sidecars); totals in $(DEMO_OUT)/run/summary.json"

# The referee zoo (configs/zoo.yaml) on the tiny set: BLIP-2 + CLIP on every prompt, the detector on spatial ones.
demo-zoo: setup
	$(PY) jobs/prompts.py --output $(DEMO_OUT)/zoo-prompts.parquet data/t2i-compbench/spatial_train.txt data/t2i-compbench/color_val.txt --limit 4
	$(PY) jobs/synthesize.py --prompts $(DEMO_OUT)/zoo-prompts.parquet --output $(DEMO_OUT)/zoo-run --config configs/tiny.yaml --config configs/zoo.yaml --num-actors 2
	@echo "per-referee scores: referee_scores in $(DEMO_OUT)/zoo-run/shards/*.parquet; python jobs/report.py --run $(DEMO_OUT)/zoo-run"

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(PARITY_ENV)
