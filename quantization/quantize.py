"""`mixdeploy quantize`: calibrate on the user's images, write an int8 model, report what it costs."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from devices.runners import file_format, in_layout
from exporters.export import check_writable, kept_as, versions
from exporters.inspect_file import contents, exported_format, inspect_file, written_options
from mixnet_deploy import load_model
from mixnet_deploy.deploy_modules import modules_called
from mixnet_deploy.errors import MixdeployError, reject_options
from mixnet_deploy.lower import lower
from mixnet_deploy.models import LoadedModel, file_stem, reload
from mixnet_deploy.parity import DEPLOYED_TOLERANCE, ParityReport, compare
from mixnet_deploy.plan import Plan
from mixnet_deploy.planner import make_plan

from . import sensitivity
from .accuracy import accuracy
from . import NUM_CALIB
from .calibration import MIN_IMAGES, check_folder, load_folder
from .keep_float import GROUPS, onnx_nodes, tflite_ops
from .onnx_qdq import saturates_here

IO_TYPES = ("int8", "uint8", "float32")
TFLITE_METHODS = ("minmax", "percentile")  # entropy is ONNX Runtime's alone


@dataclass
class QuantizeResult:
    """The int8 file, how it was calibrated, and how it compares with the float model."""

    path: Path
    format: str
    model: str
    weights: str
    method: str
    io: str
    calibration: dict
    agreement: ParityReport
    accuracy: dict | None = None
    kept_float: list[str] = field(default_factory=list)
    plan: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Within the int8 tolerance of the float model, and within --max-drop when one was given."""
        budget = self.details.get("max_drop")
        return self.agreement.passed and (budget is None or budget["met"])

    def to_dict(self) -> dict:
        return {"passed": self.passed, "path": str(self.path), "format": self.format, "model": self.model,
                "weights": self.weights,
                "method": self.method, "io": self.io, "calibration": self.calibration,
                "agreement": self.agreement.to_dict(), "accuracy": self.accuracy, "kept_float": self.kept_float,
                "plan": self.plan, **self.details}


def _source(source: str, checkpoint: str | None, pretrained: bool, calibrate_bn: bool,
            input_size: tuple[int, int] | None) -> tuple[LoadedModel, dict | None, dict]:
    """The float model behind SOURCE (a model name, or a float file mixdeploy exported), the file's
    lowering plan and the export options it was written with (its input layout, ONNX opset...)."""
    if file_format(source):
        report = inspect_file(source)
        meta = report.get("metadata", {})
        if "mixdeploy.model" not in meta:
            raise MixdeployError(f"{source} was not exported by mixdeploy (no mixdeploy metadata); export the model "
                                 "with `mixdeploy export MODEL` or pass the model name")
        if meta.get("mixdeploy.parity", {}).get("passed") is False:
            raise MixdeployError(f"{source} failed its export's parity check (kept aside to be looked into); "
                                 "quantize a float file that passed, or the model name")
        quantized = {"QuantizeLinear", "QUANTIZE"} & set(report["ops"])
        if quantized or any(t["dtype"] != "float32" for t in report["inputs"]):
            raise MixdeployError(f"{source} is already quantized; pass the float export or the model name")
        loaded = reload(meta)
        return loaded, meta.get("mixdeploy.plan"), written_options(report, loaded.preprocess.input_size)
    return load_model(source, checkpoint, pretrained, calibrate_bn, input_size), None, {}


def quantize(source: str, calib: str | Path, output: str | Path | None = None, *, fmt: str | None = None,
             checkpoint: str | None = None, pretrained: bool = False, num_calib: int = NUM_CALIB, method: str = "minmax",
             io: str | None = None, eval_dir: str | Path | None = None, num_eval: int = 1000, force: bool = False,
             max_drop: float | None = None, reduce_range: bool | None = None,
             calibrate_bn: bool = False, input_size: tuple[int, int] | None = None,
             step: Callable[[str], None] = lambda _: None) -> QuantizeResult:
    """Quantize SOURCE to int8 with images under `calib`; evaluate on (a sample of `num_eval` images
    of) `eval_dir` or on held-out calib images.
    max_drop: keep the groups of keep_float.GROUPS[fmt] in float, one more at a time, until top-1
    agreement with the float model is within `max_drop` points of 100 % and the int8 tolerance
    holds (FLOAT_FOR_SPEED groups are float from the start). io defaults to int8 for TFLite and
    float32 (the only choice) for ONNX. A file out of the int8 tolerance (DEPLOYED_TOLERANCE) is
    kept as NAME.failed.EXT: see the result's path and agreement.passed. reduce_range: ONNX weights
    in 7 bits (see onnx_qdq.quantize_onnx); None: where this machine's ONNX Runtime would saturate on
    8 bits, whose parity could not be checked here (details' reduce_range_auto says so)."""
    from exporters.formats import FORMATS

    # everything that can be checked without the model first: rebuilding it takes seconds
    from_file = file_format(source)
    if from_file:
        exported_format(source)  # before the output path: a mistyped FILE is the error to report
        given = (("--checkpoint", checkpoint), ("--pretrained", pretrained), ("--format", fmt),
                 ("--calibrate-bn", calibrate_bn), ("--input-size", input_size))
        reject_options([name for name, value in given if value],
                       f"a MODEL name; {source} keeps what it was exported with (export it again to change it)")
    fmt = from_file or fmt or "tflite"
    if fmt not in ("tflite", "onnx"):
        raise MixdeployError(f"--format {fmt!r}: use tflite or onnx")
    if fmt == "tflite" and max_drop is not None and io in ("int8", "uint8"):
        raise MixdeployError(f"--io {io} cannot hold with --max-drop: TFLite ops kept in float make the file's input "
                             "and output float32; leave out --io (int8 unless layers go float)")
    io = io or ("float32" if fmt == "onnx" else "int8")
    if io not in IO_TYPES:
        raise MixdeployError(f"--io {io!r}: use {', '.join(IO_TYPES)}")
    if fmt == "onnx" and io != "float32":
        raise MixdeployError("ONNX QDQ models keep float32 input and output; use --io float32 for onnx")
    if fmt == "tflite" and reduce_range:
        raise MixdeployError("--reduce-range is for ONNX Runtime's x86 kernels without VNNI; LiteRT's int8 kernels "
                             "take 8-bit weights exactly: leave it out for tflite")
    auto_range = fmt == "onnx" and reduce_range is None and saturates_here()
    reduce_range = bool(reduce_range) or auto_range
    if fmt == "tflite" and method not in TFLITE_METHODS:
        raise MixdeployError(f"--method {method} is ONNX Runtime's only; use {' or '.join(TFLITE_METHODS)} for tflite")
    default = Path(source).with_name(f"{Path(source).stem}_int8.{fmt}") if from_file else Path(f"{file_stem(source)}_int8.{fmt}")
    out = Path(output) if output else default
    if from_file and out.resolve() == Path(source).resolve():
        raise MixdeployError(f"output {out} is the float file being quantized; give another --output")
    check_writable(out, force, FORMATS[fmt].suffix, format_option=not from_file)
    # without --eval, a fifth of the images read is held out: read no more than that needs
    limit = num_calib if eval_dir is not None else num_calib + math.ceil(num_calib / 4)
    check_folder(calib, min(limit, MIN_IMAGES))
    if eval_dir is not None:
        check_folder(eval_dir, min(num_eval, MIN_IMAGES))
    loaded, file_plan, options = _source(source, checkpoint, pretrained, calibrate_bn, input_size)
    layout = options.get("input_layout", FORMATS[fmt].input_layout)  # the float file's, kept
    images = load_folder(calib, loaded.preprocess, limit=limit, minimum=min(limit, MIN_IMAGES), step=step)
    evaluated = None
    if eval_dir is not None:
        calibration = images
        held_out = evaluated = load_folder(eval_dir, loaded.preprocess, limit=num_eval,
                                           minimum=min(num_eval, MIN_IMAGES), step=step)
    else:
        calibration, held_out = images.split(len(images.images) - max(1, math.ceil(len(images.images) / 5)))
    size = loaded.preprocess.input_size
    target = FORMATS[fmt].target + "_int8"
    step(f"planning and lowering for {target}")
    # a float file exported with --tune DEVICE --precision int8 carries the plan measured for int8
    chosen = (Plan.from_dict(file_plan) if file_plan and file_plan.get("target") == target
              else make_plan("auto", loaded.module, size, target))
    lowered = lower(loaded.module, size, chosen, check_inputs=calibration.images[:4])
    plan = lowered.plan  # with the layers' shapes, also for a file exported before plans recorded them
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")  # this process's own (two at once)
    float_onnx = tmp.with_name(tmp.name + ".float.onnx") if fmt == "onnx" else None
    with torch.no_grad():  # in batches: a large --eval folder would not fit in memory at once
        reference = torch.cat([loaded.module(batch) for batch in held_out.images.split(64)]).numpy()
    kept: list[str] = list(FLOAT_FOR_SPEED.get(fmt, ()))
    to_keep = [g for g in GROUPS[fmt] if g not in kept]
    budget: dict | None = None
    samples = in_layout(calibration.images.numpy(), layout)
    try:
        step(f"calibrating on {len(samples)} images ({method})")
        if float_onnx is not None:
            from exporters.onnx_export import write_onnx

            write_onnx(lowered.module, size, float_onnx, **options)
            calibrated = None
        else:
            from .tflite_int8 import calibrate

            calibrated = calibrate(lowered.module, size, samples, method, layout)
        while True:
            step(f"writing {out.name}" + (f" ({', '.join(kept)} in float)" if kept else ""))
            io = "float32" if fmt == "tflite" and tflite_ops(kept) else io  # TFLite ops kept float take float io
            _write(tmp, samples, method, io, kept, float_onnx, calibrated, reduce_range)
            candidate = FORMATS[fmt].run(tmp, held_out.images.numpy())
            agreement = compare(reference, candidate, **DEPLOYED_TOLERANCE["int8"])
            if max_drop is None:
                break
            latency = FORMATS[fmt].latency(tmp, held_out.images[:1].numpy())
            budget = budget or {"budget_points": max_drop, "latency_all_int8_ms": latency,
                                "images": len(held_out.images), "points_per_image": 100 / len(held_out.images)}
            budget.update(latency_ms=latency, top1_agreement=agreement.top1_agreement,
                          met=budget_met(agreement.top1_agreement, len(held_out.images), max_drop))
            if (budget["met"] and agreement.passed) or not to_keep:
                break
            kept.append(to_keep.pop(0))
        step("per-layer SQNR")
        probe = in_layout(held_out.images[:8].numpy(), layout)
        layers = (sensitivity.onnx_layers(float_onnx, tmp, probe, modules_called(lowered.module))
                  if float_onnx is not None else sensitivity.tflite_layers(calibrated, probe, tflite_ops(kept)))
        meta = {**loaded.metadata(), "mixdeploy.plan": plan.to_dict(), "mixdeploy.quantization": {"method": method, "io": io,
                "calibration_images": len(calibration.images), "kept_float": kept, "reduce_range": reduce_range},
                "mixdeploy.parity": agreement.to_dict(), "mixdeploy.versions": versions(fmt)}
        FORMATS[fmt].add_metadata(tmp, meta)
        acc = accuracy(reference, candidate, evaluated.labels, loaded) if evaluated and evaluated.labels else None
        details = contents(tmp, fmt) | {"layers_losing_most": layers[:LAYERS_SHOWN], "max_drop": budget,
                                        "reduce_range": reduce_range, "reduce_range_auto": auto_range}
        out = kept_as(out, agreement.passed and (budget is None or budget["met"]))
        os.replace(tmp, out)  # the last step: a stop before it leaves no file
    finally:
        for path in filter(None, (tmp, float_onnx)):
            path.unlink(missing_ok=True)
    calib_info = {"folder": str(calib), "used": len(calibration.images), "evaluated": len(held_out.images),
                  "eval_folder": str(eval_dir) if eval_dir is not None else None, "skipped": len(images.skipped),
                  "skipped_files": images.skipped, "eval_skipped": len(evaluated.skipped) if evaluated else 0,
                  "eval_skipped_files": evaluated.skipped if evaluated else []}
    return QuantizeResult(out, fmt, loaded.name, loaded.weights, method, io, calib_info, agreement, acc,
                          kept, plan.layers, details)


def budget_met(top1_agreement: float, images: int, max_drop: float) -> bool:
    """Whether the images whose top-1 differs from float's fit a `max_drop`-point budget, counted in
    images (in floating point, 97.4 % of 500 images falls short of a 2.6-point budget)."""
    return round((1 - top1_agreement) * images) <= max_drop * images / 100 + 1e-9


LAYERS_SHOWN = 10
# kept in float because that is faster: ORT's int8 conv on 3 input channels is slower than its float
# conv (mixnet_s, 1 thread: 0.71x our fp32 with the first conv in float, 0.74x with it in int8)
FLOAT_FOR_SPEED = {"onnx": ("first_conv",)}


def _write(path: Path, images: np.ndarray, method: str, io: str, kept: list[str], float_onnx: Path | None,
           calibrated: bytes | None, reduce_range: bool = False) -> None:
    """Write the int8 model with the `kept` groups in float: QDQ from `float_onnx` when given, else
    from the `calibrated` TFLite model with `io` input and output."""
    if float_onnx is not None:
        from .onnx_qdq import quantize_onnx

        quantize_onnx(float_onnx, path, images, method, onnx_nodes(float_onnx, kept), reduce_range)
        return
    from .tflite_int8 import quantize_calibrated

    path.write_bytes(quantize_calibrated(calibrated, io, tflite_ops(kept)))
