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

# The main job: export mixnet_s to ONNX and TFLite, quantize both to int8 with the shipped photos,
# benchmark all four files on this machine with parity against PyTorch, print the table.
demo: $(STAMP)
	mkdir -p $(OUT)
	$(MIX) export mixnet_s --calibrate-bn --format all -o $(OUT)/mixnet_s --force
	$(MIX) quantize $(OUT)/mixnet_s.tflite --calib mixnet_deploy/sample_images -o $(OUT)/mixnet_s_int8.tflite --force
	$(MIX) quantize $(OUT)/mixnet_s.onnx --calib mixnet_deploy/sample_images -o $(OUT)/mixnet_s_int8.onnx --force
	$(MIX) bench $(OUT)/mixnet_s.onnx $(OUT)/mixnet_s_int8.onnx $(OUT)/mixnet_s.tflite $(OUT)/mixnet_s_int8.tflite --threads 1,2

test: $(STAMP)
	$(PY) -m pytest

test-quick: $(STAMP)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) build
