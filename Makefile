# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv/ in the repository root and install everything first.
VENV   := .venv
PY     := $(VENV)/bin/python
MIX    := $(VENV)/bin/mixdeploy
STAMP  := $(VENV)/.installed
OUT    := build/demo

.PHONY: install demo test test-quick clean

install: $(STAMP)

# torch and torchvision first, pinned: pip takes them from this machine's disk (never a bare `torch`).
$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(MIX) info mixnet_s

test: $(STAMP)
	$(PY) -m pytest

test-quick: $(STAMP)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) build
