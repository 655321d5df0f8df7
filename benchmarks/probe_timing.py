"""Timing single-layer probes on a runtime of this machine (used by measure_costs.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from devices.local_runtime import OrtRunner
from exporters.onnx_export import write_onnx

ALIGN = {"onnxruntime": 16}  # ONNX Runtime's NCHWc block on AVX-512


def time_onnx(probes: dict, input_size: tuple[int, int, int], tmp: Path, rounds: int) -> dict[str, float]:
    """Median ms per candidate, candidates interleaved over `rounds`, the best round kept."""
    runners = {}
    for i, (choice, lowered) in enumerate(probes.items()):
        path = tmp / f"probe{i}.onnx"
        write_onnx(lowered.module, input_size, path)
        runners[choice] = OrtRunner(path, threads=1)
    x = np.random.default_rng(0).standard_normal((1, *input_size), dtype=np.float32)
    best = {c: float("inf") for c in runners}
    for _ in range(rounds):
        for choice, runner in runners.items():
            best[choice] = min(best[choice], float(np.median(runner.time(x, runs=40, warmup=5))))
    return best


PROBE_TIMERS = {"onnxruntime": time_onnx}
