"""`mixdeploy bench` on this machine: latency of exported files at several thread counts, and
parity of their outputs with the PyTorch model on real photos."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from exporters.inspect_file import inspect_file
from mixnet_deploy.models import reload
from mixnet_deploy.errors import MixdeployError
from mixnet_deploy.parity import compare, reference_outputs
from mixnet_deploy.preprocess import SAMPLE_IMAGES, PreprocessConfig

from .local_runtime import LiteRtRunner, OrtRunner

# what a deployed file must keep of the PyTorch model's outputs, per precision; top-1 agreement of
# fp16 and int8 is reported, not gated: it depends on the model's margins (random-init logits are flat)
THRESHOLDS = {"fp32": {"max_rel": 1e-4, "min_top1": 1.0}, "fp16": {"min_cosine": 0.999},
              "int8": {"min_cosine": 0.97}}


def precision(report: dict) -> str:
    """fp32, fp16 or int8, from the ops and tensors of an exported file."""
    ops = set(report["ops"])
    if ops & {"QuantizeLinear", "QUANTIZE"} or report["inputs"][0]["dtype"] in ("int8", "uint8"):
        return "int8"
    return "fp16" if "DEQUANTIZE" in ops else "fp32"


def _runner(path: Path, threads: int):
    return OrtRunner(path, threads) if path.suffix == ".onnx" else LiteRtRunner(path, threads)


def _parity_inputs(meta: dict, folder: Path | None, n: int) -> tuple[torch.Tensor, object]:
    from quantization.calibration import load_folder

    loaded = reload(meta["mixdeploy.weights"], meta["mixdeploy.model"])
    cfg = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["mixdeploy.preprocess"].items()})
    images = load_folder(folder or SAMPLE_IMAGES, cfg, limit=n, progress=False).images
    return images, loaded.module


def bench_local(files: list[str], threads: list[int], runs: int = 50, warmup: int = 5, parity_dir: str | None = None,
                parity_n: int = 32, step: Callable[[str], None] = lambda _: None) -> list[dict]:
    """Per file: precision, size, init and first-inference time, latency stats per thread count
    (every raw timing kept), and parity with the PyTorch model."""
    results = []
    for file in files:
        path = Path(file)
        report = inspect_file(path)
        meta = report.get("metadata", {})
        if "mixdeploy.model" not in meta:
            raise MixdeployError(f"{path} carries no mixdeploy metadata; bench files written by mixdeploy export/quantize")
        prec = precision(report)
        step(f"{path.name}: parity on real photos")
        images, module = _parity_inputs(meta, Path(parity_dir) if parity_dir else None, parity_n)
        reference = reference_outputs(module, images)
        x = images.numpy()
        nhwc = path.suffix == ".tflite" and report["inputs"][0]["shape"][-1] == x.shape[1]
        feed = x.transpose(0, 2, 3, 1) if nhwc else x
        start = time.perf_counter()
        runner = _runner(path, threads[0])
        init_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        runner.run(feed[:1])
        first_ms = (time.perf_counter() - start) * 1e3
        parity = compare(reference, runner.run(feed), **THRESHOLDS[prec])
        latency = {}
        for t in threads:
            step(f"{path.name}: {runs} runs at {t} thread(s)")
            times = np.asarray(_runner(path, t).time(feed[:1], runs=runs, warmup=warmup))
            latency[str(t)] = {"median": float(np.median(times)), "mean": float(times.mean()),
                               "min": float(times.min()), "p90": float(np.percentile(times, 90)),
                               "p99": float(np.percentile(times, 99)), "std": float(times.std()),
                               "raw": [round(float(v), 4) for v in times]}
        results.append({"file": str(path), "model": meta["mixdeploy.model"], "format": path.suffix[1:],
                        "precision": prec, "size_bytes": report["size_bytes"], "init_ms": init_ms,
                        "first_inference_ms": first_ms, "latency_ms": latency[str(threads[0])],
                        "latency_by_threads": latency, "parity": parity.to_dict()})
    return results
