"""Measure single-layer timings on this machine and fit the cost model of a runtime.

    python benchmarks/measure_costs.py --runtime onnxruntime [--models mixnet_s,mixnet_m,mixnet_l] [--in-model]

--in-model re-times the grouped 1x1 layers' candidates inside their whole model (ONNX Runtime:
a single-layer probe misprices the layout changes ORT makes around a grouped conv it cannot block);
an in-model result overrides the probe only when it wins by more than IN_MODEL_NOISE.

Writes mixnet_deploy/cost_tables/RUNTIME.json (weights + how they were measured) and the raw
timings to benchmarks/results/CPU/costs_RUNTIME.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

from rich.progress import track

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixnet_deploy import load_model  # noqa: E402
from mixnet_deploy.cost_model import FEATURES, TABLES, CostModel, features, fit, shape_key  # noqa: E402
from mixnet_deploy.lower import analyse, discover, layer_info, lower  # noqa: E402
from mixnet_deploy.plan import Plan  # noqa: E402
from mixnet_deploy.probes import probe, probe_input, probed_layer  # noqa: E402
from devices.atomic import write_atomic  # noqa: E402
from benchmarks.machine import describe, results_dir  # noqa: E402
from benchmarks.probe_timing import ALIGN, PROBE_TIMERS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", choices=sorted(PROBE_TIMERS), default="onnxruntime")
    parser.add_argument("--models", default="mixnet_s,mixnet_m,mixnet_l")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--refit", action="store_true", help="Refit from the raw timings of the last run.")
    parser.add_argument("--in-model", action="store_true", help="Time pointwise candidates inside the whole model.")
    args = parser.parse_args()
    out = results_dir() / f"costs_{args.runtime}.json"
    if args.refit:
        previous = json.loads(out.read_text())
        raw, source = previous["samples"], previous["source"]
    else:
        raw, source = measure(args), {"machine": describe(), "measured": datetime.date.today().isoformat(),
                                      "models": args.models, "in_model": args.in_model}
        if args.in_model:
            in_model(args, raw)
    apply_in_model(raw)
    samples = _samples(raw)
    weights = fit(samples)
    table = _table(raw)
    picks, regret, best_total = 0, 0.0, 0.0
    probes = {s[0] for s in samples}
    for pid in probes:
        rows = [r for r in raw if str(r["probe"]) == pid]
        measured = {r["choice"]: r["ms"] for r in rows}
        predicted = {r["choice"]: sum(weights[k] * r["features"][k] for k in FEATURES) for r in rows}
        pick = min(predicted, key=predicted.get)
        best = min(measured, key=measured.get)
        picks += pick == best
        regret += measured[pick] - measured[best]
        best_total += measured[best]
    source.update({"probes": len(probes), "samples": len(samples),
                   "linear_model_best_pick_rate": round(picks / len(probes), 3),
                   "linear_model_regret_ms": round(regret, 3), "probe_best_total_ms": round(best_total, 3)})
    write_atomic(TABLES / f"{args.runtime}.json", (json.dumps(
        {"runtime": args.runtime, "align": ALIGN[args.runtime], "weights": weights, "source": source,
         "table": table}, indent=1) + "\n").encode())
    write_atomic(out, (json.dumps({"source": source, "samples": raw}, indent=1) + "\n").encode())
    print(json.dumps({"weights": weights, **source}, indent=1))


def measure(args: argparse.Namespace) -> list[dict]:
    """Time every candidate of every distinct layer shape of the models."""
    timer = PROBE_TIMERS[args.runtime]
    shapes = {}
    for name in args.models.split(","):
        loaded = load_model(name)
        for info in analyse(loaded.module, loaded.preprocess.input_size):
            shapes.setdefault(shape_key(info), info)
    raw = []
    with tempfile.TemporaryDirectory() as tmp:
        for pid, info in enumerate(track(list(shapes.values()), description=f"probing {args.runtime}")):
            probes = {c: probe(info, c) for c in info.candidates}
            times = timer(probes, probe_input(info), Path(tmp), args.rounds)
            for choice, ms in times.items():
                f = features(probed_layer(probes[choice]), info.in_hw, ALIGN[args.runtime])
                raw.append({"probe": pid, "key": shape_key(info), "layer": info.name, "kind": info.kind, "channels": info.channels,
                            "kernels": info.kernels, "stride": info.stride, "in_hw": list(info.in_hw),
                            "choice": choice, "ms": ms, "features": f})
    return raw


def _samples(raw: list[dict]) -> list[tuple[str, dict[str, float], float]]:
    return [(str(r["probe"]), r["features"], r["ms"]) for r in raw]


def _table(raw: list[dict]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for r in raw:
        table.setdefault(r["key"], {})[r["choice"]] = round(r["ms"], 5)
    return table


IN_MODEL_NOISE = 0.03  # whole-model differences below 3 % are within run-to-run drift here: the probe decides


def in_model(args: argparse.Namespace, raw: list[dict]) -> None:
    """Re-time each pointwise shape's candidates inside the first model that has it, the rest of the
    model lowered by the probe-measured plan; rows keep `probe_ms` and `in_model_ms`."""
    timer = PROBE_TIMERS[args.runtime]
    probed = CostModel(args.runtime, fit(_samples(raw)), ALIGN[args.runtime], _table(raw))
    done: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            loaded = load_model(name)
            size = loaded.preprocess.input_size
            layers = [(s, i) for s in discover(loaded.module, size) if (i := layer_info(s)) is not None]
            base = Plan({site.name: probed.choose(site, info)[0] for site, info in layers}, target=args.runtime)
            todo = [i for _, i in layers if i.kind == "pointwise" and shape_key(i) not in done]
            for info in track(todo, description=f"{name}: pointwise layers in the whole model"):
                key = shape_key(info)
                done.add(key)
                models = {c: lower(loaded.module, size, Plan(dict(base.layers, **{info.name: c}))) for c in info.candidates}
                times = timer(models, size, Path(tmp), args.rounds)
                for r in raw:
                    if r["key"] == key:
                        r.update(probe_ms=r["ms"], in_model_ms=times[r["choice"]], in_model=name)


def apply_in_model(raw: list[dict]) -> None:
    """Where a shape's in-model winner beats the probe's pick by more than IN_MODEL_NOISE of the whole
    model, its rows' `ms` become the probe's best plus the in-model differences; else the probe's."""
    for key in {r["key"] for r in raw if "in_model_ms" in r}:
        rows = [r for r in raw if r["key"] == key]
        pick = min(rows, key=lambda r: r["probe_ms"])
        best = min(rows, key=lambda r: r["in_model_ms"])
        decisive = pick["in_model_ms"] - best["in_model_ms"] > IN_MODEL_NOISE * best["in_model_ms"]
        for r in rows:
            r["ms"] = pick["probe_ms"] + r["in_model_ms"] - best["in_model_ms"] if decisive else r["probe_ms"]


if __name__ == "__main__":
    main()
