# One command each, on a fresh machine: `make test` (set up + tests), `make demo` (the main job on tiny models),
# `make parity` (converters + loaders + forward against the original LAVIS / BLIP code, in its own venv).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
DEMO_OUT ?= demo-out
# The original code's environment (tests/parity/reference_recipe.txt), rebuilt whenever the recipe changes.
PARITY_ENV ?= .parity-env

.PHONY: setup test lint demo clean chromium parity

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch on this machine; a plain `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed chromium

# The report test renders the page in headless Chromium (Debian package), installed when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	$(PY) -m pytest -q

parity: setup
	$(PY) tests/parity/reference_env.py $(PARITY_ENV)
	REFEREE_SYNTH_PARITY=1 REFEREE_SYNTH_PARITY_ENV=$(PARITY_ENV) $(PY) -m pytest -q tests/parity

demo: setup
	$(PY) jobs/prompts.py --output $(DEMO_OUT)/prompts.parquet data/t2i-compbench/color_val.txt --limit 8
	$(PY) jobs/synthesize.py --prompts $(DEMO_OUT)/prompts.parquet --output $(DEMO_OUT)/run --config configs/tiny.yaml --num-actors 2
	@echo "shards are in $(DEMO_OUT)/run/shards (WebDataset tars + Parquet sidecars); totals in $(DEMO_OUT)/run/summary.json"

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(PARITY_ENV)
