"""int8 on this CPU: mixdeploy's TFLite full-integer and ONNX QDQ files against our own fp32 files
and onnx2tf's full-integer conversion of the same model (random-init, BatchNorm calibrated on
the shipped photos; every int8 file calibrated on them), at each --threads count (default 1).

    bash benchmarks/peers/setup.sh && python benchmarks/bench_int8.py [--models mixnet_s] [--threads 1,2]

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
from devices.runners import runner_for  # noqa: E402
from exporters.export import export  # noqa: E402
from mixnet_deploy import load_model  # noqa: E402
from mixnet_deploy.preprocess import SAMPLE_IMAGES  # noqa: E402
from quantization.calibration import load_folder  # noqa: E402
from quantization.quantize import quantize  # noqa: E402


def main() -> None:
    args = arguments(__doc__, models="mixnet_s", threads="1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            files, parity = {}, {}
            loaded = load_model(name, calibrate_bn=True)
            calib = load_folder(SAMPLE_IMAGES, loaded.preprocess).images.numpy()
            for fmt in ("tflite", "onnx"):
                fp32, = export(name, fmt, work / f"{name}.{fmt}", calibrate_bn=True)
                files[f"mixdeploy {fmt} fp32"] = fp32.path
                # calibrated on every photo, as the peer is (and as bench --compare-peers does)
                q = quantize(str(fp32.path), SAMPLE_IMAGES, work / f"{name}_int8.{fmt}", num_calib=len(calib),
                             eval_dir=SAMPLE_IMAGES)
                files[f"mixdeploy {fmt} int8"], parity[f"mixdeploy {fmt} int8"] = q.path, q.agreement.to_dict()
            # calibrated on the same photos as ours; a missing or failed peer is recorded, not dropped
            path, why = peers.convert("onnx2tf", loaded.module, name, work / "o2t", calib)
            if path is None:
                print(f"{name}: onnx2tf {why}", file=sys.stderr)
            else:
                files["onnx2tf tflite int8"] = path
            for threads in map(int, args.threads.split(",")):
                runners = {k: runner_for(p, threads) for k, p in files.items()}
                feeds = {k: np.random.default_rng(0).standard_normal(r.shape, dtype=np.float32)
                         for k, r in runners.items()}
                stats = interleaved(runners, feeds, rounds=args.rounds)
                med = {k: v["median"] for k, v in stats.items()}
                ratios = {f"{fmt} int8 / fp32": med[f"mixdeploy {fmt} int8"] / med[f"mixdeploy {fmt} fp32"]
                          for fmt in ("tflite", "onnx")}
                if "onnx2tf tflite int8" in med:
                    ratios["tflite int8 / onnx2tf int8"] = med["mixdeploy tflite int8"] / med["onnx2tf tflite int8"]
                rows.append({"model": name, "threads": threads, "latency_ms": stats, "ratios": ratios,
                             "int8_parity_vs_float": parity, "peer_failures": {"onnx2tf tflite int8": why} if why else {}})
                print(name, threads, {k: round(v, 2) for k, v in med.items()}, flush=True)
    save_result("int8", rows=rows)
    print("\n| model | threads | file | median ms |\n|---|---|---|---|")
    for r in rows:
        for k, v in r["latency_ms"].items():
            print(f"| {r['model']} | {r['threads']} | {k} | {v['median']:.2f} |")
        for k, v in r["ratios"].items():
            print(f"| {r['model']} | {r['threads']} | {k} | {v:.2f}x |")
        for k, why in r["peer_failures"].items():
            print(f"| {r['model']} | {r['threads']} | {k} | {why} |")


if __name__ == "__main__":
    main()
