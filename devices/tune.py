"""`mixdeploy export --tune DEVICE`: every candidate lowering of every MixConv layer shape timed on
the device as a single-layer probe, the fastest chosen, the whole-model plan checked against the
auto and uniform plans; timings cached per device fingerprint, runtime and converter versions,
precision, threads, runs, rounds and probe version."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from mixnet_deploy.cost_model import shape_key
from mixnet_deploy.digests import file_sha256
from mixnet_deploy.errors import DeviceTimeout, MixdeployError, is_number
from mixnet_deploy.lower import LayerInfo, analyse, lower, preset_plan, signatures
from mixnet_deploy.plan import Plan
from mixnet_deploy.planner import make_plan
from mixnet_deploy.preprocess import random_images
from mixnet_deploy.probes import VERSION, probe, probe_input

from .atomic import write_atomic
from .bench import Session, Settings, runner_result
from .transport import Transport

PRECISIONS = ("fp32", "fp16", "int8")
UNIFORM = ("split", "fold")  # whole-model rivals of the tuned plan, with the cost-model plan
REFINE, CLOSE, KEEP = 4, 1.15, 0.99  # swaps tried in the whole model: runner-ups within 15 %, kept if 1 % faster


def cache_dir() -> Path:
    """Where tuning timings are kept: $MIXDEPLOY_TUNE_CACHE or ~/.cache/mixdeploy/tune."""
    return Path(os.environ.get("MIXDEPLOY_TUNE_CACHE") or Path.home() / ".cache" / "mixdeploy" / "tune")


def write_model(module: nn.Module, input_size: tuple[int, int, int], path: Path, fmt: str, precision: str) -> None:
    """A lowered module as a file the device's runtime takes, at `precision` (int8 calibrated on pink noise)."""
    if precision == "int8":
        images = random_images(8, input_size).numpy()
        if fmt == "tflite":
            from quantization.tflite_int8 import quantize_tflite

            quantize_tflite(module, input_size, path, images, io_type="int8")
        else:
            from exporters.onnx_export import write_onnx
            from quantization.onnx_qdq import quantize_onnx

            float_path = path.with_name(path.stem + ".float.onnx")
            try:
                write_onnx(module, input_size, float_path)
                quantize_onnx(float_path, path, images)
            finally:
                float_path.unlink(missing_ok=True)
    elif fmt == "tflite":
        from exporters.tflite_export import write_tflite

        write_tflite(module, input_size, path, fp16=precision == "fp16")
    else:
        from exporters.formats import FORMATS

        FORMATS["onnx"].write(module, input_size, path, {})  # as `mixdeploy export` writes it


@dataclass
class Tuning:
    """The tuned plan and what it rests on: per layer shape every candidate's ms, and the whole-model check."""

    plan: Plan
    fingerprint: dict
    layers: list[dict] = field(default_factory=list)
    refined: dict[str, str] = field(default_factory=dict)
    swaps: list[dict] = field(default_factory=list)
    whole_model_ms: dict[str, float] = field(default_factory=dict)
    measured_shapes: int = 0
    cached_shapes: int = 0
    timing: dict[str, int] = field(default_factory=dict)
    probes: dict[str, int] = field(default_factory=lambda: {"converted": 0, "reused": 0})  # probe model files

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "plan": self.plan.to_dict(), "layers": self.layers,
                "refined": self.refined, "swaps": self.swaps, "whole_model_ms": self.whole_model_ms, "measured_shapes": self.measured_shapes,
                "cached_shapes": self.cached_shapes, "timing": self.timing, "probes": self.probes}


class TimingCache:
    """Shape key -> candidate -> ms for one fingerprint, in one JSON file rewritten atomically after
    every measured shape, so an interrupted tuning keeps what it finished and nothing half-done."""

    def __init__(self, fingerprint: dict) -> None:
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self.path = cache_dir() / f"{digest}.json"
        self.fingerprint = fingerprint
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        shapes, decisions = (data.get("shapes"), data.get("decisions")) if isinstance(data, dict) else (None, None)
        well_formed = isinstance(shapes, dict) and all(isinstance(v, dict) and all(map(is_number, v.values()))
                                                       for v in shapes.values())
        # a file of another form is measured again, like an unreadable one
        self.shapes: dict[str, dict[str, float]] = shapes if well_formed else {}
        self.decisions: dict[str, dict] = decisions if well_formed and isinstance(decisions, dict) else {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({"fingerprint": self.fingerprint, "shapes": self.shapes,
                                            "decisions": self.decisions}, indent=1).encode())


class Tuner:
    """Times files on one device through the python runner, in the device's work folder."""

    def __init__(self, device: Transport, fmt: str, precision: str, settings: Settings, rounds: int, host: Path) -> None:
        self.session = Session(device, settings, host)
        self.fmt, self.precision, self.rounds, self.host = fmt, precision, rounds, host
        self.threads, self.runs = settings.threads[0], settings.runs
        info = self.session.info
        self.fingerprint = {"abi": info["abi"], "model": info["model"], "os": info["os"],
                            "cores": [c["max_khz"] for c in info["cores"]], "cpus": self.session.mask,
                            "runtime": self.session.check_python(fmt), "format": fmt, "precision": precision,
                            "threads": self.threads, "emulated": info["emulated"], "probes": VERSION,
                            "converters": _converter_versions(fmt, precision), "rounds": rounds, "runs": self.runs,
                            "statistic": "fastest run"}

    def time(self, files: dict[str, Path]) -> dict[str, float]:
        """The fastest run's ms of each file (name -> host path), timed in turns on the device."""
        device, work = self.session.device, self.session.device.workdir
        remote = {}
        for name, path in files.items():
            remote[name] = f"{work}/{path.name}"
            device.push(path, remote[name])
        argv = [*self.session.prefix, self.session.python, self.session.script, "time", *remote.values(),
                "--threads", str(self.threads), "--runs", str(self.runs), "--warmup", str(self.session.settings.warmup),
                "--rounds", str(self.rounds)]
        limit = self.session.settings.timeout
        try:
            done = device.shell(argv, timeout=limit, check=False)
        except DeviceTimeout:
            raise DeviceTimeout(f"timing {len(files)} files on {device.name} took over {limit:g} s ({self.rounds} "
                                f"rounds x {self.runs} runs): raise --timeout, or lower --tune-runs for a slow or "
                                "emulated device",
                                limit) from None
        device.shell(["rm", "-f", *remote.values()], check=False)
        ms = runner_result(done, f"timing on {device.name} failed")["ms"]
        return {name: ms[remote[name]] for name in files}


@functools.cache
def _converter_versions(fmt: str, precision: str) -> list[str]:
    """What writes a probe file: torch, and TensorFlow's converter for TFLite or ONNX Runtime's
    quantizer for int8 ONNX."""
    import torch

    if fmt == "tflite":
        import tensorflow as tf

        return [torch.__version__, tf.__version__]
    if precision == "int8":
        import onnxruntime

        return [torch.__version__, onnxruntime.__version__]
    return [torch.__version__]


def _probe_file(info: LayerInfo, choice: str, fmt: str, precision: str, counts: dict[str, int]) -> Path:
    """The probe model file of one candidate, converted once per layer shape, format, precision and
    converter version and kept in the cache (tuning another device or thread count reuses it). A
    file whose SHA-256 no longer matches the one recorded beside it (truncated, damaged) is converted again."""
    key = json.dumps([shape_key(info), choice, fmt, precision, VERSION, _converter_versions(fmt, precision)])
    path = cache_dir() / "probes" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.{fmt}"
    recorded = path.with_name(path.name + ".sha256")
    if path.exists() and recorded.exists() and recorded.read_text() == file_sha256(path):
        counts["reused"] += 1
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.{fmt}")  # tunes of two devices at once
    try:
        write_model(probe(info, choice).module, probe_input(info), partial, fmt, precision)
        digest = file_sha256(partial)
        os.replace(partial, path)
        write_atomic(recorded, digest.encode())
    finally:
        partial.unlink(missing_ok=True)
    counts["converted"] += 1
    return path


def _probe_times(tuner: Tuner, info: LayerInfo, counts: dict[str, int]) -> dict[str, float]:
    files = {choice: _probe_file(info, choice, tuner.fmt, tuner.precision, counts) for choice in info.candidates}
    return {c: round(ms, 5) for c, ms in tuner.time(files).items()}


def _rivals(model: nn.Module, input_size: tuple[int, int, int], layers: list[LayerInfo],
            target: str) -> dict[str, Plan]:
    """The plans the tuned one is timed against in the whole model: auto and the uniform ones."""
    return {"auto": make_plan("auto", model, input_size, target),
            **{name: preset_plan(layers, name, target) for name in UNIFORM}}


def _whole_model(tuner: Tuner, model: nn.Module, input_size: tuple[int, int, int], layers: list[LayerInfo],
                 plan: Plan, rivals: dict[str, Plan], shapes: dict, host: Path) -> dict:
    """Single-layer probes miss what a choice costs its neighbours (a runtime re-laying data out
    around it): the layers whose runner-up came closest are tried in the whole model, and each
    swap that makes it faster is kept; then the tuned plan is timed against the rival plans."""
    def write(label: str, candidate: Plan) -> None:
        files[label] = host / f"whole_{len(files)}.{tuner.fmt}"
        write_model(lower(model, input_size, candidate).module, input_size, files[label], tuner.fmt, tuner.precision)

    close = []
    for info in layers:
        times = shapes[shape_key(info)]
        ranked = sorted(info.candidates, key=lambda c: times[c])
        if len(ranked) > 1 and times[ranked[1]] <= CLOSE * times[ranked[0]]:
            close.append((times[ranked[1]] / times[ranked[0]], info.name, ranked[1]))
    files: dict[str, Path] = {}
    write("tuned", plan)
    swaps = {f"swap{i}": (name, runner_up) for i, (_, name, runner_up) in enumerate(sorted(close)[:REFINE])}
    for label, (name, runner_up) in swaps.items():
        write(label, Plan({**plan.layers, name: runner_up}, plan.target))
    swap_ms = tuner.time(files) if swaps else {}
    refined = dict(swap for label, swap in swaps.items() if swap_ms[label] < KEEP * swap_ms["tuned"])
    files = {}
    # each kept swap was faster alone; together they are timed against the plan without them too
    unrefined = {"per-layer": plan} if refined else {}
    for label, candidate in {"tuned": Plan({**plan.layers, **refined}, plan.target), **unrefined, **rivals}.items():
        write(label, candidate)
    whole = {k: round(v, 4) for k, v in tuner.time(files).items()}
    tried = [{"layer": name, "choice": choice, "ms": swap_ms[label]} for label, (name, choice) in swaps.items()]
    return {"refined": refined, "swaps": tried, "tuned_ms": swap_ms.get("tuned"), "whole_model_ms": whole,
            "best": min(whole, key=whole.get)}


def forward_code(model: nn.Module) -> str:
    """A digest of the source of every method of the model's module classes and their bases (forward()
    and what it calls, such as timm's forward_features): an edited one makes another model."""
    digest = hashlib.sha256()
    kinds = {cls for m in model.modules() for cls in type(m).__mro__ if cls not in (nn.Module, object)}
    for kind in sorted(kinds, key=lambda t: f"{t.__module__}.{t.__qualname__}"):
        digest.update(f"{kind.__module__}.{kind.__qualname__}".encode())
        for name, method in sorted(vars(kind).items()):
            if inspect.isfunction(method):
                with contextlib.suppress(OSError, TypeError):  # a method without Python source
                    digest.update(name.encode() + inspect.getsource(method).encode())
    return digest.hexdigest()


def tune(model: nn.Module, input_size: tuple[int, int, int], device: Transport, fmt: str, precision: str = "fp32",
         settings: Settings | None = None, rounds: int = 3, target: str | None = None,
         step: Callable[[str, int, int], None] = lambda text, done, total: None) -> Tuning:
    """Measure every uncached layer shape's candidates on the device (at `settings`' first thread
    count, its runs per round; default 1 thread, 20 runs), pick the fastest per layer,
    try the closest runner-ups inside the whole model, then time the whole model under the tuned,
    auto and uniform plans: if another plan is faster, it wins (and the plan's source says so).
    The whole-model verdict is cached too, so a second run on the device measures nothing.
    `step(text, done, total)` reports progress."""
    if precision not in PRECISIONS:
        raise MixdeployError(f"--precision {precision}: use {', '.join(PRECISIONS)}")
    if precision == "fp16" and fmt != "tflite":
        raise MixdeployError("--precision fp16 is a TFLite precision; use fp32 or int8 for ONNX")
    layers = analyse(model, input_size)
    target = target or ("litert" if fmt == "tflite" else "onnxruntime") + ("_int8" if precision == "int8" else "")
    with device, tempfile.TemporaryDirectory(prefix="mixdeploy-tune-") as tmp:
        host = Path(tmp)
        device.reserve(lambda text: step(text, 0, 1))
        step(f"connecting to {device.name}", 0, 1)
        settings = settings or Settings([1], runs=20, warmup=3)
        tuner = Tuner(device, fmt, precision, settings, rounds, host)
        cache = TimingCache(tuner.fingerprint)
        shapes = {shape_key(info): info for info in layers}
        # a shape is measured again when a lowering was added after it was cached
        todo = [key for key in shapes if not set(shapes[key].candidates) <= set(cache.shapes.get(key, {}))]
        plan = Plan(target=target, source=f"tuned on {device.name}", shapes=signatures(layers))
        result = Tuning(plan, tuner.fingerprint, measured_shapes=len(todo), cached_shapes=len(shapes) - len(todo),
                        timing={"rounds": rounds, "runs": settings.runs})
        for i, key in enumerate(todo):
            info = shapes[key]
            step(f"layer {info.name}: {len(info.candidates)} candidates", i, len(todo))
            cache.shapes[key] = _probe_times(tuner, info, result.probes)
            cache.save()
        for info in layers:
            times = cache.shapes[shape_key(info)]
            choice = min(info.candidates, key=lambda c: times[c])
            plan.layers[info.name] = choice
            plan.estimates_ms[info.name] = times[choice]
            result.layers.append({"layer": info.name, "kind": info.kind, "kernels": info.kernels,
                                  "channels": info.channels, "in_hw": list(info.in_hw), "choice": choice,
                                  "times_ms": times})
        # the rivals' plans too: the auto plan changes with the cost tables, and a verdict on another is stale
        rivals = _rivals(model, input_size, layers, target)
        # the uniform plans follow from the layers; 2: the kept swaps are timed against the plan without them;
        # the model's structure, code and size: two models may share layer names and shapes, not the rest
        key = [3, sorted(shapes), plan.layers, rivals["auto"].layers, str(model), forward_code(model), list(input_size)]
        model_key = hashlib.sha256(json.dumps(key).encode()).hexdigest()
        decision = cache.decisions.get(model_key)
        if decision is None:
            step("whole model: close calls, then the tuned plan vs the auto and uniform plans", len(todo), len(todo))
            decision = _whole_model(tuner, model, input_size, layers, plan, rivals, cache.shapes, host)
            cache.decisions[model_key] = decision
            cache.save()
        best = decision["best"]
        result.refined = decision["refined"] if best == "tuned" else {}
        result.swaps, result.whole_model_ms = decision["swaps"], decision["whole_model_ms"]
        plan.layers.update(result.refined)
        for name, choice in result.refined.items():
            plan.estimates_ms[name] = next(r["times_ms"][choice] for r in result.layers if r["layer"] == name)
        if best not in ("tuned", "per-layer"):  # per-layer: the kept swaps were slower together, and dropped
            result.plan = rivals[best]
            result.plan.source = f"{best}: faster than the per-layer tuned plan on {device.name}"
    return result
