"""Where the time goes: every block of mixdeploy's lowered model timed alone at 1 thread, with its
multiply-adds and how close it comes to this machine's fp32 GEMM speed (the floor of [3/6]); and
the whole model with swish replaced by ReLU and squeeze-excite removed. Those two are not the
model any more: they show what swish and SE cost, work no exact lowering can remove.

    python benchmarks/bench_blocks.py [--models mixnet_s] [--formats tflite,onnx] [--rounds 5]

Writes benchmarks/results/CPU/blocks.json and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_tflite import gemm_gflops  # noqa: E402
from benchmarks.machine import save_result  # noqa: E402
from benchmarks.timing import interleaved  # noqa: E402
from devices.runners import runner_for  # noqa: E402
from exporters.formats import FORMATS  # noqa: E402
from mixnet_deploy import count, load_model  # noqa: E402
from mixnet_deploy.lower import lower  # noqa: E402
from mixnet_deploy.planner import make_plan  # noqa: E402


def pieces(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """A timm MixNet cut into stem, blocks and head, in order (the same cut for the original and lowered)."""
    blocks = [(f"blocks.{i}.{j}", block) for i, stage in enumerate(model.blocks) for j, block in enumerate(stage)]
    return [("stem", nn.Sequential(model.conv_stem, model.bn1)), *blocks,
            ("head", nn.Sequential(model.conv_head, model.bn2, model.global_pool, model.classifier))]


def ablated(model: nn.Module, relu: bool, no_se: bool) -> nn.Module:
    """A copy of `model` with every SiLU made ReLU and/or every squeeze-excite made Identity."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if relu and isinstance(child, nn.SiLU):
                setattr(parent, name, nn.ReLU())
            if no_se and type(child).__name__ == "SqueezeExcite":
                setattr(parent, name, nn.Identity())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mixnet_s")
    parser.add_argument("--formats", default="tflite,onnx")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    gmacs = gemm_gflops() / 2
    rows, wholes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            loaded = load_model(name, calibrate_bn=True)
            size = loaded.preprocess.input_size
            for fmt in args.formats.split(","):
                writer = FORMATS[fmt]
                variants = {"model": loaded.module, "swish->relu": ablated(loaded.module, True, False),
                            "no SE": ablated(loaded.module, False, True),
                            "swish->relu, no SE": ablated(loaded.module, True, True)}
                files = {}
                for label, module in variants.items():
                    lowered = lower(module, size, make_plan("auto", module, size, writer.target)).module
                    files[label] = Path(tmp) / f"{name}_{label.replace(' ', '_')}{writer.suffix}"
                    writer.write(lowered, size, files[label], {})
                    if label == "model":
                        cut = pieces(lowered)
                x = np.random.default_rng(0).standard_normal((1, *size)).astype(np.float32)
                runners = {label: runner_for(path) for label, path in files.items()}
                stats = interleaved(runners, {k: r.feed(x) for k, r in runners.items()}, rounds=args.rounds)
                wholes += [{"model": name, "format": fmt, "variant": k, "latency_ms": v} for k, v in stats.items()]
                print(name, fmt, {k: round(v["min"], 2) for k, v in stats.items()}, flush=True)
                t = torch.from_numpy(x)
                for (label, block), (_, original) in zip(cut, pieces(loaded.module)):
                    shape = tuple(t.shape[1:])
                    path = Path(tmp) / f"{name}_{label}{writer.suffix}"
                    writer.write(block, shape, path, {})
                    macs = count(original, shape).conv_macs
                    runner = runner_for(path)
                    ms = interleaved({label: runner}, {label: runner.feed(t.numpy())}, rounds=args.rounds)[label]["min"]
                    rows.append({"model": name, "format": fmt, "block": label, "input": list(shape), "macs": macs,
                                 "fastest_ms": ms, "gmac_per_s": macs / ms / 1e6, "floor_ms": macs / gmacs / 1e6})
                    with torch.no_grad():
                        t = original(t)
    save_result("blocks", gemm_gmacs_1thread=gmacs, whole_models=wholes, blocks=rows)
    print("\n| model | format | variant | fastest (ms) | median (ms) |\n|---|---|---|---|---|")
    for w in wholes:
        print(f"| {w['model']} | {w['format']} | {w['variant']} | {w['latency_ms']['min']:.2f} | "
              f"{w['latency_ms']['median']:.2f} |")
    print(f"\n| model | format | block | input | MMACs | fastest (ms) | GMAC/s (GEMM {gmacs:.0f}) | floor (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['format']} | {r['block']} | {'x'.join(map(str, r['input']))} | {r['macs'] / 1e6:.1f} | "
              f"{r['fastest_ms']:.3f} | {r['gmac_per_s']:.1f} | {r['floor_ms']:.3f} |")


if __name__ == "__main__":
    main()
