"""Timing single-layer probes on a runtime of this machine (used by measure_costs.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from devices.local_runtime import LiteRtRunner, OrtRunner
from exporters.onnx_export import write_onnx
from exporters.tflite_export import write_tflite

ALIGN = {"onnxruntime": 16, "litert": 16, "litert_int8": 16}  # ONNX Runtime's NCHWc block on AVX-512; XNNPACK's channel tile


def time_onnx(probes: dict, input_size: tuple[int, int, int], tmp: Path, rounds: int) -> dict[str, float]:
    """Median ms per candidate in ONNX Runtime."""
    runners = {}
    for i, (choice, lowered) in enumerate(probes.items()):
        path = tmp / f"probe{i}.onnx"
        write_onnx(lowered.module, input_size, path)
        runners[choice] = OrtRunner(path, threads=1)
    return _best(runners, np.random.default_rng(0).standard_normal((1, *input_size), dtype=np.float32), rounds)


def time_litert(probes: dict, input_size: tuple[int, int, int], tmp: Path, rounds: int) -> dict[str, float]:
    """Median ms per candidate in LiteRT with XNNPACK (NHWC input)."""
    runners = {}
    for i, (choice, lowered) in enumerate(probes.items()):
        path = tmp / f"probe{i}.tflite"
        write_tflite(lowered.module, input_size, path)
        runners[choice] = LiteRtRunner(path, threads=1)
    c, h, w = input_size
    return _best(runners, np.random.default_rng(0).standard_normal((1, h, w, c), dtype=np.float32), rounds)


def time_litert_int8(probes: dict, input_size: tuple[int, int, int], tmp: Path, rounds: int) -> dict[str, float]:
    """Median ms per candidate in LiteRT with XNNPACK, full-integer int8 (calibrated on random data)."""
    from quantization.tflite_int8 import quantize_tflite

    calib = np.random.default_rng(1).standard_normal((8, *input_size), dtype=np.float32)
    runners = {}
    for i, (choice, lowered) in enumerate(probes.items()):
        path = tmp / f"probe{i}.tflite"
        quantize_tflite(lowered.module, input_size, path, calib, io_type="int8")
        runners[choice] = LiteRtRunner(path, threads=1)
    c, h, w = input_size
    return _best(runners, np.random.default_rng(0).standard_normal((1, h, w, c), dtype=np.float32), rounds)


def _best(runners: dict, x: np.ndarray, rounds: int) -> dict[str, float]:
    """Median ms per candidate, candidates interleaved over `rounds`, the best round kept."""
    best = {c: float("inf") for c in runners}
    for _ in range(rounds):
        for choice, runner in runners.items():
            best[choice] = min(best[choice], float(np.median(runner.time(x, runs=40, warmup=5))))
    return best


PROBE_TIMERS = {"onnxruntime": time_onnx, "litert": time_litert, "litert_int8": time_litert_int8}
