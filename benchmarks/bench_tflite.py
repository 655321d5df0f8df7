"""LiteRT (XNNPACK) on this CPU: mixdeploy's TFLite export vs onnx2tf's and litert-torch's
conversions of the same timm model and weights, plus this machine's fp32 compute floor.

    bash benchmarks/peers/setup.sh        # once: the peers' own environments
    python benchmarks/bench_tflite.py [--models mixnet_s,mixnet_m,mixnet_l] [--threads 1,2]

Writes benchmarks/results/CPU/litert.json and prints a Markdown table.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporters import peers  # noqa: E402
from benchmarks.machine import save_result  # noqa: E402
from benchmarks.timing import arguments, interleaved  # noqa: E402
from devices.runners import LiteRtRunner  # noqa: E402
from exporters.export import export  # noqa: E402
from exporters.tflite_inspect import delegation  # noqa: E402
from mixnet_deploy import count, load_model  # noqa: E402
from mixnet_deploy.models import randomize_batchnorm  # noqa: E402
from mixnet_deploy.parity import compare  # noqa: E402
from mixnet_deploy.preprocess import sample_photos  # noqa: E402


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 GEMM throughput of one thread (PyTorch), the best of `repeats`."""
    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def main() -> None:
    args = arguments(__doc__)
    gflops = gemm_gflops()
    rows, failures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            loaded = load_model(name)
            randomize_batchnorm(loaded.module, seed=1)
            ckpt = work / f"{name}.pth"
            torch.save(loaded.module.state_dict(), ckpt)
            ours, = export(name, "tflite", work / f"{name}.tflite", checkpoint=ckpt, plan="auto")
            files = {"mixdeploy": ours.path}
            for peer in ("onnx2tf", "litert_torch"):  # a missing or failed peer is recorded, not dropped
                path, why = peers.convert(peer, loaded.module, name, work / peer)
                if path is not None:
                    files[peer] = path
                else:
                    failures[f"{name}/{peer}"] = why  # printed under the table
            photos = sample_photos(loaded.preprocess)
            with torch.no_grad():
                reference = loaded.module(photos).numpy()
            nhwc = photos.numpy().transpose(0, 2, 3, 1)
            parity = {k: compare(reference, LiteRtRunner(p).run(nhwc), max_rel=1e-5).to_dict() for k, p in files.items()}
            graphs = {k: delegation(p) for k, p in files.items()}
            floor_ms = 2 * count(loaded.module, (3, 224, 224)).conv_macs / (gflops * 1e9) * 1e3
            for threads in map(int, args.threads.split(",")):
                runners = {k: LiteRtRunner(p, threads) for k, p in files.items()}
                stats = interleaved(runners, {k: nhwc for k in runners}, rounds=args.rounds)
                peer_best = min((stats[k]["median"] for k in stats if k != "mixdeploy"), default=None)
                rows.append({"model": name, "threads": threads, "latency_ms": stats, "parity": parity,
                             "graphs": graphs, "fp32_floor_ms": floor_ms,
                             "ratio_to_faster_peer": stats["mixdeploy"]["median"] / peer_best if peer_best else None,
                             "ratio_to_floor": stats["mixdeploy"]["median"] / floor_ms, "plan": ours.plan.layers})
                print(name, threads, {k: round(v["median"], 2) for k, v in stats.items()}, f"floor {floor_ms:.2f}", flush=True)
    save_result("litert", gemm_gflops_1thread=gflops, peer_failures=failures, rows=rows)
    print("\n| model | threads | mixdeploy (ms) | onnx2tf (ms) | litert-torch (ms) | ours / faster peer | fp32 floor (ms) | ours / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lat = r["latency_ms"]
        cell = lambda k: f"{lat[k]['median']:.2f}" if k in lat else "n/a"  # noqa: E731
        ratio = f"{r['ratio_to_faster_peer']:.2f}x" if r["ratio_to_faster_peer"] else "n/a"
        print(f"| {r['model']} | {r['threads']} | {cell('mixdeploy')} | {cell('onnx2tf')} | {cell('litert_torch')} | "
              f"{ratio} | {r['fp32_floor_ms']:.2f} | {r['ratio_to_floor']:.2f}x |")
    for key, why in failures.items():  # n/a above: why
        print(f"{key}: {why}")


if __name__ == "__main__":
    main()
