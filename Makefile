# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv/ in the repository root and install everything first.
VENV   := .venv
PY     := $(VENV)/bin/python
MIX    := $(VENV)/bin/mixdeploy
STAMP  := $(VENV)/.installed
OUT    := build/demo

.PHONY: install system demo test test-quick clean

install: system $(STAMP)

# System tools the device tests use: the adb client, QEMU user emulation and debootstrap for the
# virtual ARM64 device, an OpenSSH server on loopback; and python3-venv for .venv/. Installed only when missing.
SYSTEM_TOOLS := adb qemu-aarch64-static debootstrap update-binfmts sshd ssh
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
system:
	@for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || PATH="$$PATH:/usr/sbin" command -v $$tool >/dev/null || missing=1; done; \
	python3 -c "import ensurepip, venv" 2>/dev/null || missing=1; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    adb qemu-user-static debootstrap binfmt-support openssh-server openssh-client python3-venv >/dev/null; fi

# torch and torchvision first, pinned: pip takes them from this machine's disk (never a bare `torch`).
$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job: export mixnet_s to ONNX and TFLite, quantize both to int8 with the shipped photos,
# benchmark all four files on this machine with parity against PyTorch, print the table.
demo: install
	mkdir -p $(OUT)
	$(MIX) export mixnet_s --calibrate-bn --format all -o $(OUT)/mixnet_s --force
	$(MIX) quantize $(OUT)/mixnet_s.tflite --calib mixnet_deploy/sample_images -o $(OUT)/mixnet_s_int8.tflite --force
	$(MIX) quantize $(OUT)/mixnet_s.onnx --calib mixnet_deploy/sample_images -o $(OUT)/mixnet_s_int8.onnx --force
	$(MIX) bench $(OUT)/mixnet_s.onnx $(OUT)/mixnet_s_int8.onnx $(OUT)/mixnet_s.tflite $(OUT)/mixnet_s_int8.tflite --threads 1,2

# The device tests run on the virtual ARM64 device: its root filesystem is built once (2-3 min) and reused.
test: install
	$(MIX) device sim build
	$(PY) -m pytest

test-quick: install
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) build
