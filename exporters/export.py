"""`mixdeploy export`: load -> plan -> lower -> write -> check in the target runtime, as one call."""
from __future__ import annotations

import importlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from devices.runners import file_format
from mixnet_deploy import __version__, load_model
from mixnet_deploy.errors import MixdeployError
from mixnet_deploy.lower import lower
from mixnet_deploy.models import check_request, file_stem
from mixnet_deploy.parity import FLOAT32_CEILING, FLOAT32_SLACK, ParityReport, compare, float32_error, reference_outputs
from mixnet_deploy.plan import Plan
from mixnet_deploy.planner import make_plan, read_spec
from mixnet_deploy.preprocess import random_images, sample_photos

from .formats import FORMATS, Format
from .inspect_file import contents
from .onnx_export import check_opset

Planner = Callable[[torch.nn.Module, tuple[int, int, int], str], Plan]


@dataclass
class ExportResult:
    """One written file and what was checked about it."""

    format: str
    path: Path
    model: str
    weights: str
    plan: Plan
    lowering: ParityReport
    parity: ParityReport
    details: dict = field(default_factory=dict)
    size_bytes: int = 0

    @property
    def ops(self) -> dict[str, int]:
        return self.details.get("ops", {})

    @property
    def passed(self) -> bool:
        return self.parity.passed

    def to_dict(self) -> dict:
        return {"format": self.format, "path": str(self.path), "model": self.model, "weights": self.weights,
                "passed": self.passed, "size_bytes": self.size_bytes, **self.details,
                "plan": self.plan.to_dict(), "lowering_parity": self.lowering.to_dict(),
                "parity": self.parity.to_dict()}


def output_paths(model: str, fmt: str, output: str | Path | None) -> dict[str, Path]:
    """Where each format goes: --output as given for one format, as a stem for 'all'."""
    names = list(FORMATS) if fmt == "all" else [fmt]
    if fmt != "all" and fmt not in FORMATS:
        raise MixdeployError(f"unknown format {fmt!r}; use {', '.join(FORMATS)} or all")
    stem = file_stem(model)
    base = Path(output) if output else Path(stem)
    if fmt == "all" and output and (base.is_dir() or str(output).endswith(("/", os.sep))):
        raise MixdeployError(f"output {output} names a folder; --format all takes a file stem, such as "
                             f"{base / stem} (writes {stem}.onnx and {stem}.tflite there)")
    if fmt == "all" or not output:
        return {n: base.with_suffix(FORMATS[n].suffix) if file_format(base)
                else base.parent / (base.name + FORMATS[n].suffix) for n in names}
    return {fmt: base}


def check_writable(path: Path, force: bool, suffix: str | None = None, format_option: bool = False) -> None:
    """Fail early, before any work, when `path` cannot or must not be written (or lacks `suffix`;
    format_option: the command takes a --format that could fit the path instead)."""
    if path.is_dir():
        raise MixdeployError(f"output {path} is a directory; give a file path")
    if suffix is not None and path.suffix.lower() != suffix:
        other = file_format(path) if format_option else None
        raise MixdeployError(f"output {path} must end in {suffix}, the suffix of the file written; give a path "
                             f"ending in {suffix}" + (f" or pass --format {other}" if other else ""))
    if path.exists() and not force:
        raise MixdeployError(f"output {path} exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise MixdeployError(f"{parent} is a file, not a folder; give another output path")
    if not parent.is_dir():
        raise MixdeployError(f"output folder {parent} does not exist; create it or give another output path")
    try:  # create a file there: os.access passes folders that take none (/proc, a read-only mount as root)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise MixdeployError(f"cannot write in output folder {parent} ({exc.strerror}); give another output path") from None


def kept_as(path: Path, passed: bool) -> Path:
    """Where a written file goes: `path`, or NAME.failed.EXT when it is out of tolerance."""
    return path if passed else path.with_suffix(".failed" + path.suffix)


CONVERTERS = {"onnx": ("onnx", "onnxruntime"), "tflite": ("tensorflow", "ai_edge_litert")}  # modules


def versions(fmt: str) -> dict[str, str]:
    """mixdeploy's and the packages that made and checked a file of format `fmt` (imported by then)."""
    return {"mixdeploy": __version__, **{name: importlib.import_module(name).__version__
                                         for name in ("torch", "timm", *CONVERTERS[fmt])}}


def check_outputs(model: str, fmt: str, output: str | Path | None, force: bool = False, options: dict | None = None,
                  plan: str | Planner = "auto") -> dict[str, Path]:
    """Each format's output path, once the paths, the ONNX opset and the plan spec are checked
    (export's first step; `export --tune` takes it before reaching the device)."""
    paths = output_paths(model, fmt, output)
    for name, path in paths.items():
        check_writable(path, force, FORMATS[name].suffix, format_option=True)
    if "onnx" in paths:
        check_opset((options or {}).get("opset", 18))
    if not callable(plan):
        read_spec(plan)
    return paths


def export(model: str, fmt: str = "onnx", output: str | Path | None = None, *, checkpoint: str | Path | None = None,
           pretrained: bool = False, plan: str | Planner = "auto", force: bool = False, options: dict | None = None,
           calibrate_bn: bool = False, input_size: tuple[int, int] | None = None,
           step: Callable[[str], None] = lambda _: None) -> list[ExportResult]:
    """Export MODEL to each requested format; a file out of tolerance is kept as *.failed.EXT.

    plan: auto, split, fold, a plan file, or a function (module, input size, target) -> Plan, such as
    a tuner measuring on a device. options: opset, dynamic_batch (ONNX); fp16 (TFLite); input_layout (nhwc or nchw;
    default: TFLite nhwc, ONNX nchw).
    input_size: (height, width) to export at instead of the model's own resolution."""
    check_request(model, checkpoint, pretrained, calibrate_bn, input_size)  # a typo is named before any output check
    paths = check_outputs(model, fmt, output, force, options, plan)
    step(f"loading {model}")
    loaded = load_model(model, checkpoint, pretrained, calibrate_bn, input_size)
    size = loaded.preprocess.input_size
    photos = sample_photos(loaded.preprocess)
    x = torch.cat([random_images(4, size), photos])
    step(f"PyTorch reference in float64 on {len(x)} images")
    reference = reference_outputs(loaded.module, x)
    floor: dict[str, float] = {}  # what PyTorch's own float32 run misses by, once a float32 bound needs it
    checked: list[tuple[str, Path, Plan, ParityReport, ParityReport]] = []
    # the process's own partial files: two exports to one path at once would remove each other's
    partials = {name: path.with_name(f".{path.name}.{os.getpid()}.partial") for name, path in paths.items()}
    try:  # every format is written and checked before any file takes its place: all of them or none
        for name, tmp in partials.items():
            writer: Format = FORMATS[name]
            step(f"planning for {writer.target}")
            chosen = (plan(loaded.module, size, writer.target) if callable(plan)
                      else make_plan(plan, loaded.module, size, writer.target))
            step("lowering and verifying against the original")
            lowered = lower(loaded.module, size, chosen, check_inputs=photos)
            chosen = lowered.plan  # with the layers' shapes, whatever the plan's source recorded
            step(f"writing {paths[name].name}")
            writer.write(lowered.module, size, tmp, options or {})  # imports the converter quietly, before versions()
            metadata = {**loaded.metadata(), "mixdeploy.plan": chosen.to_dict(), "mixdeploy.versions": versions(name)}
            step(f"checking {paths[name].name} in {writer.runtime_name}")
            candidate = writer.run(tmp, x.numpy())
            tolerance = writer.tolerance(options or {})
            if "max_rel" in tolerance:  # a deep model's own float32 run may come near 1e-5: twice that is float32's best
                floor = floor or {"torch_float32_rel_max": float32_error(loaded.module, x, reference)}
                own = floor["torch_float32_rel_max"]
                tolerance["max_rel"] = max(tolerance["max_rel"], min(FLOAT32_SLACK * own, FLOAT32_CEILING))
            report = compare(reference, candidate, **tolerance)
            writer.add_metadata(tmp, dict(metadata, **{"mixdeploy.parity": report.to_dict()}))
            checked.append((name, kept_as(paths[name], report.passed), chosen, lowered.parity, report))
        for name, final, *_ in checked:
            os.replace(partials[name], final)
    finally:
        for tmp in partials.values():
            tmp.unlink(missing_ok=True)
    return [ExportResult(name, final, loaded.name, loaded.weights, chosen, lowering, report,
                         contents(final, name) | floor, final.stat().st_size)
            for name, final, chosen, lowering, report in checked]
