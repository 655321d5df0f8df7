"""int8 on this CPU: mixdeploy's TFLite full-integer and ONNX QDQ files against our own fp32 files
and onnx2tf's full-integer conversion of the same model (random-init, BatchNorm calibrated on
the shipped photos), 1 thread.

    bash benchmarks/peers/setup.sh && python benchmarks/bench_int8.py [--models mixnet_s]

Writes benchmarks/results/CPU/int8.json and prints a Markdown table.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporters import peers  # noqa: E402
from benchmarks.machine import save_result  # noqa: E402
from benchmarks.timing import arguments, interleaved  # noqa: E402
from devices.runners import OrtRunner, runner_for  # noqa: E402
from exporters.export import export  # noqa: E402
from mixnet_deploy import load_model  # noqa: E402
from mixnet_deploy.preprocess import SAMPLE_IMAGES  # noqa: E402
from quantization.quantize import quantize  # noqa: E402


def main() -> None:
    args = arguments(__doc__, models="mixnet_s", threads="1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            files = {}
            for fmt in ("tflite", "onnx"):
                fp32, = export(name, fmt, work / f"{name}.{fmt}", calibrate_bn=True)
                files[f"mixdeploy {fmt} fp32"] = fp32.path
                q = quantize(str(fp32.path), SAMPLE_IMAGES, work / f"{name}_int8.{fmt}")
                files[f"mixdeploy {fmt} int8"] = q.path
            if peers.available()["onnx2tf"]:
                files["onnx2tf tflite int8"] = peers.onnx2tf(load_model(name, calibrate_bn=True).module, name, work / "o2t",
                                                             int8=True)
            runners = {k: runner_for(p) for k, p in files.items()}
            feeds = {}
            for k, r in runners.items():
                shape = r.input.shape if isinstance(r, OrtRunner) else r.input["shape"]
                feeds[k] = np.random.default_rng(0).standard_normal(tuple(shape), dtype=np.float32)
            stats = interleaved(runners, feeds, rounds=args.rounds)
            rows.append({"model": name, "threads": 1, "latency_ms": stats})
            print(name, {k: round(v["median"], 2) for k, v in stats.items()}, flush=True)
    save_result("int8", rows=rows)
    print("\n| model | file | median ms (1 thread) |\n|---|---|---|")
    for r in rows:
        for k, v in r["latency_ms"].items():
            print(f"| {r['model']} | {k} | {v['median']:.2f} |")


if __name__ == "__main__":
    main()
