# Everything a new user runs goes through here. `make demo` and `make test` set up `.venv` themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned to wheels that work together. On x86_64 the registry's torch is a CUDA build
# (about 6 GB installed, 3 GB of it CUDA libraries) that also runs on the CPU; where PyTorch's CPU index can be
# reached, `make install TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cpu"` installs a
# CPU-only build, several times smaller. On a GPU machine, e.g. `make install TORCH="torch torchvision"`.
ifeq ($(shell uname -m),aarch64)
TORCH ?= torch==2.9.1 torchvision==0.24.1
else
TORCH ?= torch==2.14.1 torchvision==0.29.1
endif
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

.PHONY: install demo demo-new-class compare test bench lint format clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(OFFLINE) $(PY) -m training.demo --output_dir demo_output $(ARGS)

compare: install
	$(OFFLINE) $(PY) -m training.compare --output_dir compare_output $(ARGS)

demo-new-class: install
	$(OFFLINE) $(PY) -m training.demo_new_class --output_dir demo_new_class $(ARGS)

test: install
	$(OFFLINE) $(PY) -m pytest -q tests $(ARGS)

bench: install
	$(OFFLINE) $(PY) -m benchmarks.run_all $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf demo_output demo_new_class bench_output compare_output compare_smoke .pytest_cache
