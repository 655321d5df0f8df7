"""`mixdeploy bench` on this machine: latency of exported files at several thread counts, and
parity of their outputs with the PyTorch model on real photos."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from exporters.inspect_file import inspect_file
from mixnet_deploy.errors import MixdeployError
from mixnet_deploy.models import reload
from mixnet_deploy.parity import compare, reference_outputs
from mixnet_deploy.preprocess import SAMPLE_IMAGES, PreprocessConfig

from .local_runtime import latency_stats, runner_for

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


def _parity_inputs(meta: dict, folder: Path | None, n: int) -> tuple[torch.Tensor, object]:
    from quantization.calibration import load_folder

    loaded = reload(meta["mixdeploy.weights"], meta["mixdeploy.model"])
    cfg = PreprocessConfig.from_dict(meta["mixdeploy.preprocess"])
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
        start = time.perf_counter()
        runner = runner_for(path, threads[0])
        init_ms = (time.perf_counter() - start) * 1e3
        feed = runner.feed(images.numpy())
        start = time.perf_counter()
        runner.run(feed[:1])
        first_ms = (time.perf_counter() - start) * 1e3
        parity = compare(reference, runner.run(feed), **THRESHOLDS[prec])
        latency = {}
        for t in threads:
            step(f"{path.name}: {runs} runs at {t} thread(s)")
            latency[str(t)] = latency_stats(runner_for(path, t).time(feed[:1], runs=runs, warmup=warmup))
        results.append({"file": str(path), "model": meta["mixdeploy.model"], "weights": meta["mixdeploy.weights"],
                        "format": path.suffix[1:],
                        "precision": prec, "size_bytes": report["size_bytes"], "init_ms": init_ms,
                        "first_inference_ms": first_ms, "latency_ms": latency[str(threads[0])],
                        "latency_by_threads": latency, "parity": parity.to_dict()})
    return results
