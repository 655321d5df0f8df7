"""int8 on this CPU: mixdeploy's TFLite full-integer and ONNX QDQ files against our own fp32 files
and onnx2tf's full-integer conversion of the same model (random-init, BatchNorm calibrated on
the shipped photos), 1 thread.

    bash benchmarks/peers/setup.sh && python benchmarks/bench_int8.py [--models mixnet_s]

Writes benchmarks/results/int8.json and prints a Markdown table.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import peers  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from benchmarks.timing import arguments, interleaved  # noqa: E402
from devices.local_runtime import LiteRtRunner, OrtRunner  # noqa: E402
from exporters.export import export  # noqa: E402
from mixnet_deploy import load_model  # noqa: E402
from mixnet_deploy.preprocess import SAMPLE_IMAGES  # noqa: E402
from quantization.quantize import quantize  # noqa: E402


def onnx2tf_int8(model: torch.nn.Module, name: str, work: Path) -> Path:
    """onnx2tf's full-integer quantization (-oiqt) of the plain opset-17 export."""
    work.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(work / f"{name}.onnx"), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"])
    np.save(work / peers.ONNX2TF_SAMPLE, np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32))
    env = dict(peers.OFFLINE, PATH=f"{peers.VENVS / 'onnx2tf/bin'}:{os.environ['PATH']}")
    subprocess.run([str(peers.VENVS / "onnx2tf/bin/onnx2tf"), "-i", f"{name}.onnx", "-o", "out", "-oiqt"],
                   cwd=work, env=env, check=True, capture_output=True)
    return work / "out" / f"{name}_full_integer_quant.tflite"


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
                q = quantize(str(fp32.path), SAMPLE_IMAGES, work / f"{name}_int8.{fmt}",
                             io="int8" if fmt == "tflite" else "float32")
                files[f"mixdeploy {fmt} int8"] = q.path
            if peers.available()["onnx2tf"]:
                files["onnx2tf tflite int8"] = onnx2tf_int8(load_model(name, calibrate_bn=True).module, name, work / "o2t")
            runners = {k: OrtRunner(p) if p.suffix == ".onnx" else LiteRtRunner(p) for k, p in files.items()}
            feeds = {}
            for k, r in runners.items():
                shape = r.input.shape if isinstance(r, OrtRunner) else r.input["shape"]
                feeds[k] = np.random.default_rng(0).standard_normal(tuple(shape), dtype=np.float32)
            stats = interleaved(runners, feeds, rounds=args.rounds)
            rows.append({"model": name, "threads": 1, "latency_ms": stats})
            print(name, {k: round(v["median"], 2) for k, v in stats.items()}, flush=True)
    result = {"benchmark": "int8", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "machine": describe(), "rows": rows}
    (Path(__file__).parent / "results" / "int8.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n| model | file | median ms (1 thread) |\n|---|---|---|")
    for r in rows:
        for k, v in r["latency_ms"].items():
            print(f"| {r['model']} | {k} | {v['median']:.2f} |")


if __name__ == "__main__":
    main()
