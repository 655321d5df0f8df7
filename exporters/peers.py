"""The peers we are measured against, on the same model (timm's, or the user's own) and weights: the plain
torch.onnx.export, ORT's quantizer with its defaults, and onnx2tf and litert-torch, each run from
its own virtual environment (made by benchmarks/peers/setup.sh, or $MIXDEPLOY_PEER_VENVS)."""
from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
VENVS = Path(os.environ.get("MIXDEPLOY_PEER_VENVS") or HERE.parent / "benchmarks" / "peers" / ".venvs")
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
# onnx2tf downloads this sample file on every conversion of an image model; offline, a local copy stops it
ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def available() -> dict[str, bool]:
    """Which peer converters have their environment here."""
    return {"onnx2tf": (VENVS / "onnx2tf/bin/onnx2tf").exists(),
            "litert_torch": (VENVS / "litert_torch/bin/python").exists()}


def versions() -> dict[str, dict[str, str]]:
    """Each peer environment's converter and the packages behind it, as installed (read from pip's records)."""
    wanted = {"onnx2tf": ("onnx2tf", "tensorflow", "onnx", "ai_edge_litert"),
              "litert_torch": ("litert_torch", "torch", "ai_edge_litert")}
    found = {}
    for peer, packages in wanted.items():
        records = {d.name.split("-")[0].lower(): d.name.removesuffix(".dist-info").split("-")[1]
                   for d in (VENVS / peer).glob("lib/python*/site-packages/*.dist-info")}
        if records:
            found[peer] = {name: records[name] for name in packages if name in records}
    return found


def plain_onnx(model: nn.Module, name: str, work: Path, input_size: tuple[int, int, int] = (3, 224, 224)) -> Path:
    """torch.onnx.export of the model as it is (what a user gets without mixdeploy)."""
    from .onnx_export import write_onnx

    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{name}_plain.onnx"
    write_onnx(model, input_size, path)
    return path


def ort_quantizer(float_onnx: Path, images: np.ndarray) -> Path:
    """onnxruntime.quantization.quantize_static with its defaults (QDQ, per-tensor) on the same images."""
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from quantization.onnx_qdq import CalibrationReader

    prepared = float_onnx.with_name(float_onnx.stem + "_prep.onnx")
    out = float_onnx.with_name(float_onnx.stem + "_ort_int8.onnx")
    try:
        quant_pre_process(str(float_onnx), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), CalibrationReader(images, "input"))
    finally:  # failed too: a --keep folder holds the peers' files, not their scratch
        prepared.unlink(missing_ok=True)
    return out


def onnx2tf(model: nn.Module, name: str, work: Path, calib: np.ndarray | None = None,
            input_size: tuple[int, int, int] = (3, 224, 224)) -> Path:
    """The plain torch.onnx.export (opset 17) of `model`, converted by onnx2tf with onnxsim; with
    `calib` (preprocessed NCHW images), its full-integer quantization (-oiqt) calibrated on them:
    the same images ours is calibrated on, not the sample file it falls back to."""
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(1, *input_size),), str(onnx_path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"])
    np.save(work / ONNX2TF_SAMPLE, np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32))
    int8 = []
    if calib is not None:  # -cind takes NHWC data and normalizes it as (x - mean) / std: ours are normalized already
        np.save(work / "calib.npy", np.ascontiguousarray(calib.transpose(0, 2, 3, 1), dtype=np.float32))
        int8 = ["-oiqt", "-cind", "input", "calib.npy", "[[[[0.0]]]]", "[[[[1.0]]]]"]
    env = dict(OFFLINE, PATH=f"{VENVS / 'onnx2tf/bin'}:{os.environ['PATH']}")
    subprocess.run([str(VENVS / "onnx2tf/bin/onnx2tf"), "-i", onnx_path.name, "-o", f"{name}_onnx2tf", *int8],
                   cwd=work, env=env, check=True, capture_output=True)
    return work / f"{name}_onnx2tf" / f"{name}_{'full_integer_quant' if int8 else 'float32'}.tflite"


def litert_torch(model: nn.Module, name: str, work: Path, input_size: tuple[int, int, int] = (3, 224, 224),
                 spec: str | None = None) -> Path:
    """litert-torch's conversion of the same model and weights, with channel-last io; `spec` is how its
    environment builds the model (the timm name, or an own network's FILE.py:FACTORY; default `name`)."""
    work.mkdir(parents=True, exist_ok=True)
    weights, out = work / f"{name}_weights.pt", work / f"{name}_litert_torch.tflite"
    torch.save(model.state_dict(), weights)
    subprocess.run([str(VENVS / "litert_torch/bin/python"), str(HERE / "peer_litert_torch.py"), spec or name,
                    str(weights), str(out), *map(str, input_size)], env=OFFLINE, check=True, capture_output=True)
    return out


def run_checked(fn: Callable[..., Path], *args: object) -> tuple[Path | None, str | None]:
    """(path, None) or (None, the reason the peer failed)."""
    try:
        return fn(*args), None
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        return None, " | ".join(tail)[:300]
    except Exception as exc:  # a peer failing is a result to report (one line in the table), not a crash
        return None, " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:300]


def convert(peer: str, *args: object) -> tuple[Path | None, str | None]:
    """A converter peer's file (onnx2tf or litert_torch, given its converter's arguments), or (None,
    why): its environment is missing here, or how it failed. Benchmarks record the reason."""
    if not available()[peer]:
        return None, f"not installed here (bash benchmarks/peers/setup.sh creates {VENVS / peer})"
    path, why = run_checked({"onnx2tf": onnx2tf, "litert_torch": litert_torch}[peer], *args)
    return path, None if path is not None else f"failed: {why}"
