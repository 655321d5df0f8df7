"""Plans measured on the device (`export --tune local`) vs the cost-model `auto` plan, whole models.

    python benchmarks/bench_tune.py [--models mixnet_m] [--formats onnx,tflite] [--precisions fp32,int8]

Tunes on this machine (an empty tuning cache, so every layer is measured), then times the whole
model under the tuned, auto and split plans in interleaved rounds. Writes
benchmarks/results/CPU/tune.json (tune_int8.json etc. for other precisions) and prints a Markdown table.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import save_result  # noqa: E402
from benchmarks.timing import interleaved  # noqa: E402
from devices.connect import open_device  # noqa: E402
from devices.runners import runner_for  # noqa: E402
from devices.tune import tune, write_model  # noqa: E402
from mixnet_deploy import load_model  # noqa: E402
from mixnet_deploy.lower import analyse, lower, preset_plan  # noqa: E402
from mixnet_deploy.planner import make_plan  # noqa: E402


def main() -> None:
    import argparse
    import os

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mixnet_m")
    parser.add_argument("--formats", default="onnx,tflite")
    parser.add_argument("--precisions", default="fp32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MIXDEPLOY_TUNE_CACHE"] = str(Path(tmp) / "cache")
        for name in args.models.split(","):
            loaded = load_model(name, calibrate_bn=True)
            size = loaded.preprocess.input_size
            for fmt in args.formats.split(","):
                for precision in args.precisions.split(","):
                    start = time.time()
                    tuning = tune(loaded.module, size, open_device("local"), fmt, precision)
                    tune_s = time.time() - start
                    target = tuning.plan.target
                    plans = {"tuned": tuning.plan, "auto": make_plan("auto", loaded.module, size, target),
                             "split": preset_plan(analyse(loaded.module, size), "split", target)}
                    files = {}
                    for label, plan in plans.items():
                        files[label] = Path(tmp) / f"{name}_{fmt}_{precision}_{label}.{fmt}"
                        write_model(lower(loaded.module, size, plan).module, size, files[label], fmt, precision)
                    for threads in map(int, args.threads.split(",")):
                        runners = {label: runner_for(path, threads) for label, path in files.items()}
                        x = {label: np.random.default_rng(0).standard_normal(r.shape).astype(np.float32)
                             for label, r in runners.items()}
                        stats = interleaved(runners, x, rounds=args.rounds)
                        row = {"model": name, "format": fmt, "precision": precision, "threads": threads,
                               "tune_seconds": round(tune_s, 1), "measured_shapes": tuning.measured_shapes,
                               "chosen": tuning.plan.source, "tuning_whole_model_ms": tuning.whole_model_ms,
                               "ms": stats, "tuned_vs_auto": stats["tuned"]["median"] / stats["auto"]["median"],
                               "changed_layers": sum(tuning.plan.layers[k] != v for k, v in plans["auto"].layers.items()),
                               "layers": len(plans["auto"].layers)}
                        rows.append(row)
                        print(f"{name} {fmt} {precision} {threads}t: tuned {stats['tuned']['median']:.2f} ms, auto "
                              f"{stats['auto']['median']:.2f} ms, split {stats['split']['median']:.2f} ms "
                              f"(tuned/auto {row['tuned_vs_auto']:.3f}; {row['changed_layers']}/{row['layers']} "
                              f"layers differ; tuning {tune_s:.0f} s)", flush=True)
    save_result("_".join(["tune"] + [p for p in args.precisions.split(",") if p != "fp32"]), rows=rows)
    print("\n| model | format | precision | threads | tuned (ms) | auto (ms) | split (ms) | tuned / auto | layers changed |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['format']} | {r['precision']} | {r['threads']} | {r['ms']['tuned']['median']:.2f} | "
              f"{r['ms']['auto']['median']:.2f} | {r['ms']['split']['median']:.2f} | {r['tuned_vs_auto']:.2f}x | "
              f"{r['changed_layers']}/{r['layers']} |")


if __name__ == "__main__":
    main()
