"""Runtimes on this machine behind one small interface: load a file, run it, time it."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


class OrtRunner:
    """ONNX Runtime on the CPU with a fixed number of intra-op threads."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        """Outputs of the first output for a batch in the model's own layout."""
        if self.input.shape[0] == 1 and len(x) > 1:
            return np.concatenate([self.run(x[i:i + 1]) for i in range(len(x))])
        return self.session.run(None, {self.input.name: x.astype(np.float32)})[0]

    def time(self, x: np.ndarray, runs: int = 50, warmup: int = 5) -> list[float]:
        """Latencies in ms of `runs` single runs after `warmup` runs."""
        for _ in range(warmup):
            self.run(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.run(x)
            times.append((time.perf_counter() - start) * 1e3)
        return times
