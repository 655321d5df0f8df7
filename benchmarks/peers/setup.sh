#!/usr/bin/env bash
# One virtual environment per peer converter, under benchmarks/peers/.venvs/ (kept out of git).
# onnx2tf pins old exact versions, so it is installed with --no-deps next to its own pins;
# litert-torch brings jax/transformers/torchao and must get torch from this machine's disk.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p .venvs
# a venv of other versions than these pins is made again (the results record the versions used)
pinned() { [ -x ".venvs/$1/bin/python" ] && ".venvs/$1/bin/python" -c \
  "import importlib.metadata as m, sys; sys.exit(m.version('$2') != '$3')" 2>/dev/null; }
if ! pinned onnx2tf onnx2tf 1.29.24; then
  rm -rf .venvs/onnx2tf
  python3 -m venv .venvs/onnx2tf
  .venvs/onnx2tf/bin/pip install -q --upgrade pip
  .venvs/onnx2tf/bin/pip install -q numpy==1.26.4 onnx==1.19.1 onnxruntime==1.23.0 opencv-python-headless==4.11.0.86 \
    onnxsim==0.4.36 onnxoptimizer==0.4.2 ai-edge-litert==2.1.0 tensorflow==2.19.0 tf-keras==2.19.0 \
    onnx-graphsurgeon==0.5.8 simple-onnx-processing-tools==1.1.32 psutil==5.9.5 protobuf==4.25.5 h5py==3.11.0 \
    ml-dtypes==0.5.1 flatbuffers==25.12.19 requests
  .venvs/onnx2tf/bin/pip install -q --no-deps onnx2tf==1.29.24
fi
if ! pinned litert_torch litert-torch 0.10.0 || ! .venvs/litert_torch/bin/python -c "import litert_torch" 2>/dev/null; then
  rm -rf .venvs/litert_torch
  python3 -m venv .venvs/litert_torch
  .venvs/litert_torch/bin/pip install -q --upgrade pip
  .venvs/litert_torch/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  .venvs/litert_torch/bin/pip install -q litert-torch==0.10.0 timm
fi
echo "peers ready: $(ls .venvs)"
