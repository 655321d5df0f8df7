"""ONNX Runtime CPU: the plain torch.onnx.export of each timm MixNet vs mixdeploy's export.

    python benchmarks/bench_onnx.py [--models mixnet_s,mixnet_m,mixnet_l] [--threads 1,2]

Writes benchmarks/results/CPU/onnxruntime.json and prints a Markdown table.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import save_result  # noqa: E402
from benchmarks.timing import arguments, interleaved  # noqa: E402
from devices.runners import OrtRunner  # noqa: E402
from exporters.export import export  # noqa: E402
from exporters.onnx_export import write_onnx  # noqa: E402
from mixnet_deploy import load_model  # noqa: E402


def main() -> None:
    args = arguments(__doc__)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            plain = Path(tmp) / f"{name}_plain.onnx"
            write_onnx(load_model(name).module, (3, 224, 224), plain)
            ours, = export(name, "onnx", Path(tmp) / f"{name}.onnx", plan="auto")
            x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
            for threads in map(int, args.threads.split(",")):
                runners = {"plain": OrtRunner(plain, threads), "ours": OrtRunner(ours.path, threads)}
                stats = interleaved(runners, {k: x for k in runners}, rounds=args.rounds)
                rows.append({"model": name, "threads": threads, "plain_ms": stats["plain"], "ours_ms": stats["ours"],
                             "ratio": stats["ours"]["median"] / stats["plain"]["median"],
                             "ours_parity": ours.parity.to_dict(), "ours_ops": ours.ops,
                             "plan": ours.plan.layers})
                print(f"{name} {threads}t plain {stats['plain']['median']:.2f} ms ours {stats['ours']['median']:.2f} ms "
                      f"ratio {rows[-1]['ratio']:.3f}", flush=True)
    save_result("onnxruntime", rows=rows)
    print("\n| model | threads | plain torch.onnx.export (ms) | mixdeploy (ms) | ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['threads']} | {r['plain_ms']['median']:.2f} | {r['ours_ms']['median']:.2f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
