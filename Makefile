# Two entry points for a fresh machine: `make run` (the main job on the embedded tiny model)
# and `make test`. Both create .venv and install what they need; torch 2.13.0 (CPU) goes first
# so that nothing later pulls a CUDA build.
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/mistral-export
STAMP  := $(VENV)/.installed
OUTDIR ?= build/tiny
PROMPT ?= def read_config(path):
BACKEND ?= onnxruntime
JOBS   ?= auto

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(CLI) inspect tiny --context 4096
	$(CLI) build tiny -o $(OUTDIR) --backend $(BACKEND)
	$(CLI) inspect $(OUTDIR)
	$(CLI) validate $(OUTDIR) --quick
	$(CLI) generate --backend $(BACKEND) --build $(OUTDIR) --prompt '$(PROMPT)' --max-new-tokens 80

# Test files spread over the cores (a file's module fixtures stay in one process); JOBS=0 runs serially.
test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) --dist loadfile

# ruff (configured in pyproject.toml): lint rules and the formatter's check; CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build .pytest_cache
