"""Peer converters, each run from its own virtual environment (benchmarks/peers/setup.sh)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
# onnx2tf downloads this sample file on every conversion of an image model; offline, a local copy stops it
ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def available() -> dict[str, bool]:
    return {"onnx2tf": (VENVS / "onnx2tf/bin/onnx2tf").exists(),
            "litert_torch": (VENVS / "litert_torch/bin/python").exists()}


def onnx2tf(model: nn.Module, name: str, work: Path, int8: bool = False) -> Path:
    """The plain torch.onnx.export (opset 17) of `model`, converted by onnx2tf with onnxsim
    (with int8: its full-integer quantization, -oiqt)."""
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(1, 3, 224, 224),), str(onnx_path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"])
    np.save(work / ONNX2TF_SAMPLE, np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32))
    env = dict(OFFLINE, PATH=f"{VENVS / 'onnx2tf/bin'}:{os.environ['PATH']}")
    subprocess.run([str(VENVS / "onnx2tf/bin/onnx2tf"), "-i", onnx_path.name, "-o", f"{name}_onnx2tf"]
                   + (["-oiqt"] if int8 else []), cwd=work, env=env, check=True, capture_output=True)
    return work / f"{name}_onnx2tf" / f"{name}_{'full_integer_quant' if int8 else 'float32'}.tflite"


def litert_torch(model: nn.Module, name: str, work: Path) -> Path:
    """litert-torch's conversion of the same timm model and weights, with channel-last io."""
    work.mkdir(parents=True, exist_ok=True)
    weights, out = work / f"{name}_weights.pt", work / f"{name}_litert_torch.tflite"
    torch.save(model.state_dict(), weights)
    subprocess.run([str(VENVS / "litert_torch/bin/python"), str(HERE / "litert_torch_convert.py"), name,
                    str(weights), str(out)], env=OFFLINE, check=True, capture_output=True)
    return out


def run_checked(fn, *args) -> tuple[Path | None, str | None]:
    """(path, None) or (None, the reason the peer failed)."""
    try:
        return fn(*args), None
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        return None, " | ".join(tail)[:300]
    except Exception as exc:  # a peer failing is a result to report, not a crash
        print(f"peer failed: {exc}", file=sys.stderr)
        return None, str(exc)[:300]
