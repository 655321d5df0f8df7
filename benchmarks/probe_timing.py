"""Timing single-layer probes on a runtime of this machine (used by measure_costs.py)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np
from torch import nn

from devices.runners import LiteRtRunner, OrtRunner
from exporters.formats import FORMATS
from exporters.onnx_export import write_onnx
from exporters.tflite_export import write_tflite

ALIGN = {"onnxruntime": 16, "onnxruntime_int8": 16, "litert": 16, "litert_int8": 16}  # ORT's NCHWc block on AVX-512; XNNPACK's tile


def _calibration(input_size: tuple[int, int, int]) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((8, *input_size), dtype=np.float32)


def _int8_tflite(module: nn.Module, input_size: tuple[int, int, int], path: Path) -> None:
    from quantization.tflite_int8 import quantize_tflite

    quantize_tflite(module, input_size, path, _calibration(input_size), io_type="int8")


def _int8_onnx(module: nn.Module, input_size: tuple[int, int, int], path: Path) -> None:
    from quantization.onnx_qdq import quantize_onnx

    float_path = path.with_suffix(".float.onnx")
    write_onnx(module, input_size, float_path)
    quantize_onnx(float_path, path, _calibration(input_size))


def _timer(write: Callable, runner: type, suffix: str, nhwc: bool) -> Callable:
    """A timer: write every candidate probe, then median ms per candidate, interleaved over rounds."""

    def time(probes: dict, input_size: tuple[int, int, int], tmp: Path, rounds: int) -> dict[str, float]:
        runners = {}
        for i, (choice, lowered) in enumerate(probes.items()):
            path = tmp / f"probe{i}{suffix}"
            write(lowered.module, input_size, path)
            runners[choice] = runner(path, threads=1)
        c, h, w = input_size
        x = np.random.default_rng(0).standard_normal((1, h, w, c) if nhwc else (1, c, h, w), dtype=np.float32)
        best = {choice: float("inf") for choice in runners}
        for _ in range(rounds):
            for choice, r in runners.items():
                best[choice] = min(best[choice], float(np.median(r.time(x, runs=40, warmup=5))))
        return best

    return time


PROBE_TIMERS = {
    "onnxruntime": _timer(functools.partial(FORMATS["onnx"].write, options={}), OrtRunner, ".onnx", nhwc=False),  # as exported
    "onnxruntime_int8": _timer(_int8_onnx, OrtRunner, ".onnx", nhwc=False),
    "litert": _timer(write_tflite, LiteRtRunner, ".tflite", nhwc=True),
    "litert_int8": _timer(_int8_tflite, LiteRtRunner, ".tflite", nhwc=True),
}
