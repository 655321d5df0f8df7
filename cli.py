"""The `mixdeploy` command: parse arguments, call the Python API, render a table or JSON."""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mixnet_deploy import strict_json
from mixnet_deploy.errors import MixdeployError, reject_options
from mixnet_deploy.terminal import stderr_is_interactive
from quantization import NUM_CALIB

if TYPE_CHECKING:
    from devices.bench import Settings
    from devices.transport import Transport

# markup off: paths, model, layer and device names print as they are; styles are given as Text or style=
out = Console(width=None if sys.stdout.isatty() else 120, soft_wrap=not sys.stdout.isatty(),  # logs: a line per line
              markup=False)
err = Console(stderr=True, markup=False)
HEARTBEAT_S = 10.0  # how often long work reports its current step when stderr is not a terminal


@contextlib.contextmanager
def _progress(title: str) -> Iterator[Callable[[str], None]]:
    """Yield a function that sets the current step of long work. On a terminal: a spinner on
    stderr. Elsewhere (logs, CI): a line `mixdeploy: [ELAPSED s] STEP` every HEARTBEAT_S seconds,
    so work that ends sooner, or stops at bad input, prints nothing more than its result. Both write
    to a copy of stderr's descriptor: quiet_native_stderr() points descriptor 2 at /dev/null meanwhile."""
    if sys.stderr is None:  # closed (2>&-): nowhere to report
        yield lambda _: None
        return
    try:
        stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding=sys.stderr.encoding,
                           errors="backslashreplace")  # as sys.stderr: a step's name never stops the reports
    except (OSError, io.UnsupportedOperation):  # stderr without a descriptor (captured)
        stream = sys.stderr
    try:
        if stderr_is_interactive():
            with Console(file=stream).status(Text(title)) as status:
                yield lambda text: status.update(Text(text))  # steps name files: no markup in them
        else:
            with _heartbeat(title, stream) as step:
                yield step
    finally:
        if stream is not sys.stderr:
            stream.close()


@contextlib.contextmanager
def _heartbeat(title: str, stream) -> Iterator[Callable[[str], None]]:
    """The current step printed to `stream` every HEARTBEAT_S seconds, from a thread."""
    current, started, done = [title], time.monotonic(), threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_S):
            try:
                print(f"mixdeploy: [{time.monotonic() - started:.0f} s] {current[0]}", file=stream, flush=True)
            except (OSError, ValueError):  # the reader went away (a closed pipe): stop reporting
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield lambda text: current.__setitem__(0, text)
    finally:
        done.set()
        thread.join()


class GivenPath(click.Path):
    """A path that is not empty ("" is the current folder to Python: an unset shell variable, most likely)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; give a path (an unset shell variable?)", param, ctx)
        return super().convert(value, param, ctx)


class Finite(click.FloatRange):
    """A FloatRange that also refuses nan, which passes every bound (a comparison with nan is false), and inf."""

    def convert(self, value, param, ctx) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def _input_size(ctx, param, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        sides = tuple(int(v) for v in value.lower().split("x"))
    except ValueError:
        sides = ()
    if len(sides) not in (1, 2):
        raise click.BadParameter(f"{value!r}: give one side (192) or height x width (192x256)")
    return (sides[0], sides[-1])


input_size_option = click.option("--input-size", callback=_input_size, metavar="N|HxW",
                                 help="Input resolution of a MODEL name instead of its own, e.g. 192 or 192x256 "
                                 "(bench: with --compare-peers; a file keeps the size it was exported at).")


def _echo_json(data: object) -> None:
    """Print `data` as strict JSON (NaN and infinity as null: parsers such as jq reject them)."""
    click.echo(strict_json.dumps(data, indent=2))


def _reject_given(names: tuple[str, ...], goes_with: str) -> None:
    """A usage error when options among `names` (parameter names) were given: they only go with `goes_with`."""
    ctx = click.get_current_context()
    reject_options([p.opts[0] for p in ctx.command.params
                    if p.name in names and ctx.get_parameter_source(p.name) is not click.core.ParameterSource.DEFAULT],
                   goes_with)


PRETRAINED = "timm's pretrained weights (downloaded; offline, from the Hugging Face cache)."


def model_options(fn: Callable) -> Callable:
    """MODEL plus the options that say which weights to load and at what input resolution."""
    fn = input_size_option(fn)
    fn = click.option("--calibrate-bn", is_flag=True,
                      help="Random-init only: BatchNorm statistics from the shipped photos (realistic activations "
                           "for benchmarks and int8 without trained weights).")(fn)
    fn = click.option("--pretrained", is_flag=True, help=PRETRAINED)(fn)
    fn = click.option("--checkpoint", type=GivenPath(), help="Local weights (.pth/.pt/.safetensors) for MODEL.")(fn)
    return click.argument("model")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mixdeploy")
def cli() -> None:
    """Export MixNet classifiers to ONNX and TFLite, quantize them, benchmark them on devices."""


@cli.command()
@model_options
@click.option("--plan", "plan", help="Also show the lowering plan: auto, split, fold or a plan JSON file.")
@click.option("--target", type=click.Choice(["onnxruntime", "litert"]), default="onnxruntime", show_default=True,
              help="Runtime whose cost model makes the auto plan.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def info(model: str, checkpoint: str | None, pretrained: bool, calibrate_bn: bool, input_size: tuple[int, int] | None,
         plan: str | None, target: str, as_json: bool) -> None:
    """Parameters, multiply-adds, input config and MixConv layers of MODEL (and its lowering plan).

    MODEL may also be an exported .onnx or .tflite file: ops by type, what XNNPACK takes, size,
    input/output tensors and the metadata mixdeploy embedded."""
    from devices.runners import file_format
    from mixnet_deploy import count, load_model
    from mixnet_deploy.planner import make_plan, read_spec

    if plan is None:
        _reject_given(("target",), "--plan")
    if file_format(model):
        _reject_given(("checkpoint", "pretrained", "calibrate_bn", "input_size", "plan", "target"),
                      "a MODEL name; an exported FILE keeps what it was exported with")
        _file_info(model, as_json)
        return
    if plan is not None:  # an empty --plan "$UNSET" is refused, not ignored
        read_spec(plan)
    with _progress(f"loading {model}") as step:  # seconds for a large model, minutes for a download
        loaded = load_model(model, checkpoint, pretrained, calibrate_bn, input_size)
        step("counting parameters and multiply-adds")
        stats = count(loaded.module, loaded.preprocess.input_size)
        if plan is not None:
            step(f"planning for {target}")
        chosen = make_plan(plan, loaded.module, loaded.preprocess.input_size, target) if plan is not None else None
    if as_json:
        report = {
            "model": loaded.name, "weights": loaded.weights, "params": stats.params, "macs": stats.macs,
            "conv_macs": stats.conv_macs, "preprocess": loaded.preprocess.to_dict(),
            "num_classes": loaded.num_classes, "labels": loaded.labels,
            "mixconv_layers": [asdict(layer) for layer in stats.mixconv_layers],
        }
        if chosen:
            report["plan"] = chosen.to_dict()
        _echo_json(report)
        return
    pre = loaded.preprocess
    from mixnet_deploy.models import has_pretrained

    weights = (f"{loaded.weights} (pass {'--pretrained or ' if has_pretrained(model) else ''}--checkpoint for "
               "trained weights)"
               if loaded.random_init else loaded.weights)
    out.print(_headline(loaded.name, f"weights: {weights}"))
    out.print(f"params {stats.params / 1e6:.2f} M   MACs {stats.macs / 1e6:.1f} M (conv+linear {stats.conv_macs / 1e6:.1f} M)")
    out.print(
        f"input {pre.input_size}  mean {pre.mean}  std {pre.std}  crop_pct {pre.crop_pct}  "
        f"interpolation {pre.interpolation}  classes {loaded.num_classes}"
    )
    table = Table(title="MixConv layers")
    for col in ("layer", "kind", "channels", "kernels", "stride", "MACs (M)"):
        table.add_column(col, no_wrap=True)
    for layer in stats.mixconv_layers:
        kernels = ",".join(f"{k}" + (f"d{d}" if d > 1 else "") for k, d in zip(layer.kernel_sizes, layer.dilation))
        table.add_row(layer.name, layer.kind, ",".join(map(str, layer.channels)), kernels, str(layer.stride), f"{layer.macs / 1e6:.2f}")
    out.print(table)
    if chosen:
        by_name = {layer.name: layer for layer in stats.mixconv_layers}
        plan_table = Table(title=f"lowering plan ({chosen.source}, for {chosen.target})")
        for col in ("layer", "kernels", "choice", "cost (ms)"):
            plan_table.add_column(col, no_wrap=True)
        for name, choice in chosen.layers.items():
            ks = ",".join(map(str, by_name[name].kernel_sizes)) if name in by_name else ""
            est = chosen.estimates_ms.get(name)
            plan_table.add_row(name, ks, choice, f"{est:.3f}" if est is not None else "")
        out.print(plan_table)


def _file_info(path: str, as_json: bool) -> None:
    from exporters.inspect_file import inspect_file
    from exporters.tflite_inspect import delegation_text
    from mixnet_deploy.parity import ParityReport

    with _progress(f"reading {Path(path).name}"):  # a .tflite file loads TensorFlow's converter (seconds)
        report = inspect_file(path)
    if as_json:
        _echo_json(report)
        return
    opset = f" opset {report['opset']}" if report.get("opset") else ""
    out.print(_headline(report["path"], f"{report['format']}{opset} {report['precision']}  "
                                        f"{report['size_bytes'] / 1e6:.2f} MB"))
    out.print("ops: " + ", ".join(f"{k} {v}" for k, v in report["ops"].items()))
    if "delegated" in report:
        out.print(delegation_text(report))
    for kind in ("inputs", "outputs"):
        for t in report[kind]:
            out.print(f"{kind[:-1]} {t['name']}: {t['dtype']} {t['shape']}")
    meta = report.get("metadata", {})
    if "mixdeploy.model" in meta:  # other tools' files carry metadata of their own (Ultralytics' author, stride)
        parity = meta.get("mixdeploy.parity", {})
        stored = ParityReport.from_dict(parity)
        verdict = stored.summary() if stored else ("PASS" if parity.get("passed") else "FAIL") if parity else "not recorded"
        out.print(f"model {meta.get('mixdeploy.model')} ({meta.get('mixdeploy.weights')}); parity when written: {verdict}")
        if meta.get("mixdeploy.plan"):
            out.print(_plan_line(meta["mixdeploy.plan"]))
        if meta.get("mixdeploy.preprocess"):
            out.print("preprocess: " + ", ".join(f"{k} {v}" for k, v in meta["mixdeploy.preprocess"].items()))
        if meta.get("mixdeploy.versions"):
            out.print("written with " + ", ".join(f"{k} {v}" for k, v in meta["mixdeploy.versions"].items()))
    else:
        out.print("no mixdeploy metadata: not exported by mixdeploy")


def _plan_line(plan: dict) -> str:
    """`plan (SOURCE, TARGET): CHOICE xN, ...` of a plan's dict."""
    choices = ", ".join(f"{c} x{n}" for c, n in sorted(Counter(plan.get("layers", {}).values()).items()))
    return f"plan ({plan.get('source')}, {plan.get('target')}): {choices or 'no MixConv layer'}"


def _headline(bold: str, rest: str, *more: str | tuple[str, str]) -> Text:
    """A result's first line: its file or name in bold, then what it is."""
    return Text.assemble((bold, "bold"), "  ", rest, *more)


def _verdict(passed: bool) -> Text:
    return Text("PASS", style="green") if passed else Text("FAIL", style="red")


def _render_parity(title: str, report) -> Table:
    table = Table(title=title)
    for col in ("samples", "max abs", "rel to max|ref|", "rel L2", "cosine", "PSNR dB", "top-1", "top-5", "verdict"):
        table.add_column(col, no_wrap=True)
    table.add_row(str(report.samples), f"{report.max_abs:.3g}", f"{report.rel_max:.3g}", f"{report.rel_l2:.3g}",
                  f"{report.cosine:.7f}", f"{report.psnr_db:.1f}", f"{report.top1_agreement:.1%}",
                  f"{report.top5_agreement:.1%}", _verdict(report.passed))
    return table


@cli.command()
@model_options
@click.option("--format", "fmt", type=click.Choice(["onnx", "tflite", "all"]), default="onnx", show_default=True,
              help="What to write: an ONNX file, a TFLite file, or both (all).")
@click.option("--output", "-o", type=GivenPath(), help="Output file (a stem for --format all). Default: MODEL.EXT here (FACTORY.EXT for FILE.py:FACTORY).")
@click.option("--plan", "plan", default="auto", show_default=True, help="auto, split, fold or a plan JSON file.")
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True, help="ONNX opset.")
@click.option("--dynamic-batch", is_flag=True, help="ONNX: leave the batch dimension free.")
@click.option("--fp16", is_flag=True, help="TFLite: float16 weights.")
@click.option("--input-layout", type=click.Choice(["nhwc", "nchw"]),
              help="Input layout. Default: nhwc for TFLite, nchw for ONNX; the other adds one transpose at the input.")
@click.option("--tune", "tune_device", metavar="DEVICE",
              help="Measure the plan on DEVICE (local, SERIAL, adb:SERIAL, ssh:USER@HOST[:PORT]) instead of --plan.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]),
              help="What --tune times: fp32, fp16 (TFLite) or int8 (the plan `mixdeploy quantize` then reuses).")
@click.option("--tune-threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --tune: the one thread count the plan is measured and chosen for.")
@click.option("--tune-runs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed runs per candidate in each of 3 rounds (fewer for a slow or emulated device).")
@click.option("--cpus", help="With --tune: cores to pin to, as for bench [default: big on an Android phone].")
@click.option("--python", "python", type=GivenPath(readable=False), help="With --tune: the device's Python [default: python3].")
@click.option("--timeout", type=Finite(min=1, max=86400), default=900, show_default=True,
              help="With --tune: seconds one timing call (a layer's candidates, or the whole-model plans) may take.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def export(model: str, checkpoint: str | None, pretrained: bool, calibrate_bn: bool, input_size: tuple[int, int] | None,
           fmt: str, output: str | None, plan: str,
           opset: int, dynamic_batch: bool, fp16: bool, input_layout: str | None, tune_device: str | None,
           precision: str | None, tune_threads: int, tune_runs: int, cpus: str | None, python: str | None,
           timeout: float, force: bool, as_json: bool) -> None:
    """Lower MODEL and write it as ONNX and/or TFLite, then check it in the target runtime.

    With --tune DEVICE the lowering plan is measured on DEVICE: every MixConv layer's candidate
    lowerings are timed there as single-layer models (cached per device, runtime and precision)."""
    from exporters.export import check_outputs
    from exporters.export import export as run_export
    from exporters.tflite_inspect import delegation_text

    if precision and not tune_device:
        raise MixdeployError("--precision goes with --tune DEVICE (use --fp16 for a float16 TFLite export)")
    if not tune_device:
        _reject_given(("tune_threads", "tune_runs", "cpus", "python", "timeout"), "--tune DEVICE")
    if fmt == "onnx":
        _reject_given(("fp16",), "--format tflite or all (TFLite only)")
    if fmt == "tflite":
        _reject_given(("opset", "dynamic_batch"), "--format onnx or all (ONNX only)")
    if fmt == "onnx" and precision == "fp16":
        raise MixdeployError("--precision fp16 goes with --format tflite or all (ONNX exports stay fp32)")
    if tune_device and plan != "auto":
        raise MixdeployError("--tune measures the plan; leave out --plan")
    if fp16 and precision not in (None, "fp16"):
        raise MixdeployError(f"--fp16 writes a float16 file, --precision {precision} times another; give "
                             "--precision fp16 alone, or leave out --fp16")
    fp16 = fp16 or precision == "fp16"
    tunings: list = []
    with _progress("exporting") as step:
        options = {"opset": opset, "dynamic_batch": dynamic_batch, "fp16": fp16, "input_layout": input_layout}
        if tune_device:  # the device and its runtimes before the model (seconds to minutes): they fail at once
            from devices.bench import Settings, check_runner
            from devices.connect import open_device
            from mixnet_deploy.models import check_request

            settings = Settings([tune_threads], runs=tune_runs, warmup=3, cpus=cpus, timeout=timeout, python=python)
            check_request(model, checkpoint, pretrained, calibrate_bn, input_size)
            check_outputs(model, fmt, output, force, options)
            step(f"connecting to {tune_device}")
            device = open_device(tune_device)
            check_runner(device, settings, {"onnx", "tflite"} if fmt == "all" else {fmt}, step)
            plan = _tuner(device, precision or ("fp16" if fp16 else "fp32"), settings, tunings, step)
        results = run_export(model, fmt, output, checkpoint=checkpoint, pretrained=pretrained, plan=plan,
                             force=force, options=options, calibrate_bn=calibrate_bn, input_size=input_size,
                             step=step)
    if as_json:
        reports = [r.to_dict() for r in results]
        for report, tuning in zip(reports, tunings):
            report["tuning"] = tuning.to_dict()
        _echo_json(reports)
    else:
        for tuning in tunings:
            whole = ", ".join(f"{k} {v:.2f} ms" for k, v in tuning.whole_model_ms.items())
            out.print(f"tuned {tuning.fingerprint['format']} {tuning.fingerprint['precision']} on "
                      f"{tuning.plan.source.split(' on ')[-1]}: {tuning.measured_shapes} layer shapes measured, "
                      f"{tuning.cached_shapes} from the cache; whole model: {whole}")
        for r in results:
            out.print(_headline(str(r.path), f"{r.model} ({r.weights})  {r.size_bytes / 1e6:.1f} MB"))
            out.print(_plan_line(r.plan.to_dict()))
            out.print("ops: " + ", ".join(f"{k} {v}" for k, v in r.ops.items()))
            if "delegated" in r.details:
                out.print(delegation_text(r.details))
            out.print(_render_parity(f"lowered torch vs original ({r.lowering.rel_max:.2g} of max|ref|)", r.lowering))
            out.print(_render_parity(f"{r.format} file vs PyTorch", r.parity))
            if "max_rel" in r.parity.tolerance:
                out.print(f"bound {r.parity.tolerance['max_rel']:.3g} of max|ref|; PyTorch's own float32 run: "
                          f"{r.details['torch_float32_rel_max']:.3g}")
    failed = [r for r in results if not r.passed]
    if failed:
        for r in failed:
            click.echo(f"mixdeploy: error: {r.format} parity out of tolerance ({r.parity.summary()}); kept as {r.path}", err=True)
        sys.exit(1)


def _tuner(device: Transport, precision: str, settings: Settings, tunings: list, report: Callable[[str], None]):
    """A planner for export(): tune on `device` (a transport) for the format of each target, keeping each tuning."""
    from devices.tune import tune

    def plan(module, size, target):
        fmt = "tflite" if target.startswith("litert") else "onnx"
        timed = "fp32" if fmt == "onnx" and precision == "fp16" else precision  # ONNX exports stay fp32
        result = tune(module, size, device, fmt, timed, settings,
                      step=lambda text, done, total: report(f"tuning {fmt} on {device.name} [{done}/{total}]: {text}"))
        tunings.append(result)
        return result.plan

    return plan


@cli.command()
@click.argument("source", metavar="FILE_OR_MODEL")
@click.option("--calib", required=True, type=GivenPath(), help="Folder of calibration images (recursive).")
@click.option("--output", "-o", type=GivenPath(), help="Output file. Default: FILE_int8.EXT next to FILE, or MODEL_int8.EXT here.")
@click.option("--format", "fmt", type=click.Choice(["tflite", "onnx"]), help="For a MODEL name (default tflite).")
@click.option("--checkpoint", type=GivenPath(), help="Weights for a MODEL name.")
@click.option("--pretrained", is_flag=True, help=f"For a MODEL name: {PRETRAINED}")
@click.option("--calibrate-bn", is_flag=True, help="For a random-init MODEL name: BatchNorm statistics from the shipped photos.")
@input_size_option
@click.option("--num-calib", type=click.IntRange(min=1), default=NUM_CALIB, show_default=True,
              help="Calibration images: a seeded random sample of --calib (without --eval, a fifth is held out).")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax", show_default=True,
              help="Activation ranges: min/max, clipped to the 99.999th percentile, or entropy (onnx only).")
@click.option("--io", type=click.Choice(["int8", "uint8", "float32"]), help="Input/output type (tflite default int8, onnx float32).")
@click.option("--eval", "eval_dir", type=GivenPath(), help="Held-out images (ImageFolder layout adds accuracy).")
@click.option("--num-eval", type=click.IntRange(min=1), default=1000, show_default=True,
              help="With --eval: images evaluated (a seeded random sample).")
@click.option("--max-drop", type=Finite(min=0, max=100), help="Keep sensitive layers in float until "
              "top-1 agreement with float is within POINTS of 100 %.", metavar="POINTS")
@click.option("--reduce-range/--no-reduce-range", default=None, help="ONNX: 7-bit weights, for x86 CPUs without "
              "VNNI (their AVX2 int8 kernels saturate on 8-bit weights; ARM and VNNI kernels do not). Default: on "
              "where this machine is such a CPU, else off.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def quantize(source: str, calib: str, output: str | None, fmt: str | None, checkpoint: str | None, pretrained: bool,
             calibrate_bn: bool, input_size: tuple[int, int] | None, num_calib: int,
             method: str, io: str | None, eval_dir: str | None, num_eval: int, max_drop: float | None,
             reduce_range: bool | None, force: bool, as_json: bool) -> None:
    """int8 post-training quantization of FILE_OR_MODEL, calibrated on the images under --calib."""
    from mixnet_deploy.models import RANDOM_INIT
    from quantization.quantize import quantize as run_quantize

    if eval_dir is None:
        _reject_given(("num_eval",), "--eval DIR")
    with _progress("quantizing") as step:
        result = run_quantize(source, calib, output, fmt=fmt, checkpoint=checkpoint, pretrained=pretrained,
                              num_calib=num_calib, method=method, io=io, eval_dir=eval_dir, num_eval=num_eval,
                              force=force, calibrate_bn=calibrate_bn, max_drop=max_drop, reduce_range=reduce_range,
                              input_size=input_size, step=step)
    budget = result.details.get("max_drop")
    if as_json:
        _echo_json(result.to_dict())
    else:
        _print_quantized(result)
    problems = [f"--max-drop {budget['budget_points']} not met even with {', '.join(result.kept_float)} in float "
                f"(top-1 agreement {budget['top1_agreement']:.1%})"] if budget and not budget["met"] else []
    if not result.agreement.passed:
        problems.append(f"int8 parity out of tolerance ({result.agreement.summary()})")
    if problems:
        from quantization.onnx_qdq import saturates_here

        if result.weights == RANDOM_INIT:
            hint = ("random-init weights have no realistic activation ranges: use trained weights, or random-init "
                    "ones with --calibrate-bn (on export for a file)")
        elif budget and not budget["met"] and (advice := _eval_advice(budget)):
            hint = advice
        else:
            hint = ("try more calibration images" + (", --method percentile" if method != "percentile" else "")
                    + (" or --max-drop" if max_drop is None else ""))
        if result.format == "onnx" and not result.details["reduce_range"] and saturates_here():
            hint += ("; and this x86 CPU has no VNNI: ONNX Runtime's int8 kernels here saturate on 8-bit weights "
                     "(leave out --no-reduce-range)")
        click.echo(f"mixdeploy: error: {'; '.join(problems)}; kept as {result.path}; {hint}", err=True)
        sys.exit(1)


FIRM_VERDICT = 10  # held-out images below which quantize's int8 verdict is flagged as weak


def _eval_advice(budget: dict) -> str | None:
    """What to do when too few held-out images judged a --max-drop budget (enough: one disagreement
    fits the budget, and at least 100), else None."""
    points = budget["budget_points"]
    needed = max(100, math.ceil(100 / points)) if points else 100
    if budget["images"] >= needed:
        return None
    return (f"judged on {budget['images']} held-out images (one disagreement = {budget['points_per_image']:.3g} "
            f"points): pass --eval DIR with at least {needed} images for a verdict at this budget")


def _print_quantized(result) -> None:
    cal = result.calibration
    out.print(_headline(str(result.path), f"{result.model} ({result.weights})  int8 {result.format}, io {result.io}, "
                                          f"{result.method} calibration on {cal['used']} images "
                                          f"({cal['skipped']} unreadable skipped)"))
    out.print("ops: " + ", ".join(f"{k} {v}" for k, v in result.details.get("ops", {}).items()))
    if result.details.get("reduce_range_auto"):
        out.print("weights in 7 bits: this x86 CPU has no VNNI, and ONNX Runtime's int8 kernels here saturate on 8-bit "
                  "ones (--no-reduce-range keeps 8 bits, for ARM or VNNI targets; parity here then fails)")
    a = result.agreement
    skipped = f" ({cal['eval_skipped']} unreadable skipped)" if cal["eval_skipped"] else ""
    out.print(f"vs float on {cal['evaluated']} held-out images{skipped}: top-1 agreement {a.top1_agreement:.1%}, "
              f"top-5 {a.top5_agreement:.1%}, cosine {a.cosine:.5f} (at least {a.tolerance['min_cosine']}: "
              f"{'PASS' if a.passed else 'FAIL'}), SQNR {a.sqnr_db:.1f} dB")
    budget = result.details.get("max_drop")
    if budget:
        out.print(f"--max-drop {budget['budget_points']}: {'met' if budget['met'] else 'NOT met'}; in float: "
                  f"{', '.join(result.kept_float) or 'nothing'}; latency {budget['latency_ms']:.2f} ms vs "
                  f"{budget['latency_all_int8_ms']:.2f} ms without --max-drop's float layers")
    advice = _eval_advice(budget) if budget else None
    if advice is None and cal["evaluated"] < FIRM_VERDICT:
        advice = (f"judged on {cal['evaluated']} held-out images, too few for a firm verdict (bench's parity may "
                  f"differ): pass --eval DIR with at least {FIRM_VERDICT} images")
    if advice:
        out.print(advice, style="yellow")
    worst = result.details.get("layers_losing_most", [])
    if worst:
        out.print("layers losing most (SQNR dB): " + ", ".join(f"{w['layer']} {w['sqnr_db']:.1f}" for w in worst))
    if result.accuracy:
        acc = result.accuracy
        out.print(f"accuracy: float top-1 {acc['float_top1']:.1f} %, int8 top-1 {acc['int8_top1']:.1f} % "
                  f"(drop {acc['top1_drop_points']:.2f} points); top-5 {acc['float_top5']:.1f} / {acc['int8_top5']:.1f} %")


@cli.command()
@click.argument("files", nargs=-1)
@click.option("--compare-peers", "peer_model", metavar="MODEL",
              help="Export MODEL with mixdeploy and with every peer available here; bench them side by side.")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="With --compare-peers: the precision compared (int8 calibrated on the parity photos).")
@click.option("--checkpoint", type=GivenPath(), help="With --compare-peers: local weights for MODEL.")
@click.option("--pretrained", is_flag=True, help=f"With --compare-peers: {PRETRAINED}")
@click.option("--calibrate-bn", is_flag=True, help="With --compare-peers: random-init BatchNorm statistics from photos.")
@click.option("--keep", type=GivenPath(), help="With --compare-peers: keep every compared file in this new or empty "
              "folder [default: a temporary one, removed].")
@input_size_option
@click.option("--device", default="local", show_default=True,
              help="local, an adb SERIAL (or adb:SERIAL; HOST:PORT is adb-connected), or ssh:USER@HOST[:PORT].")
@click.option("--threads", default="1", show_default=True, help="Thread counts to sweep, e.g. 1,2,4.")
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Timed runs per file and thread count.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True,
              help="Untimed runs before them.")
@click.option("--cpus", help="Cores to pin to: a hex mask (f0) or big [default: big on an Android phone].")
@click.option("--runner", type=click.Choice(["python", "benchmark_model"]), default="python", show_default=True,
              help="python3 with ai-edge-litert/onnxruntime on the device, or LiteRT's benchmark_model (.tflite).")
@click.option("--benchmark-binary", type=GivenPath(), help="benchmark_model built for the device.")
@click.option("--python", "python", type=GivenPath(readable=False), help="The device's Python for the python runner [default: python3].")
@click.option("--parity", "parity_dir", type=GivenPath(), help="Photos for the parity check (default: the shipped ones).")
@click.option("--parity-samples", type=click.IntRange(min=1), default=32, show_default=True,
              help="Photos of --parity run on the device (the 14 shipped ones at most without --parity).")
@click.option("--cooldown", type=Finite(min=0, max=3600), help="Seconds between models [default: 10 on a phone, else 0].")
@click.option("--timeout", type=Finite(min=1, max=86400), default=900, show_default=True,
              help="Seconds one model may take on the device.")
@click.option("--report", type=GivenPath(), help="Also write a Markdown report (.md) here, with a PNG plot beside it.")
@click.option("--force", is_flag=True, help="Overwrite an existing report.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def bench(files: tuple[str, ...], peer_model: str | None, precision: str, checkpoint: str | None, pretrained: bool,
          calibrate_bn: bool, keep: str | None, input_size: tuple[int, int] | None, device: str, threads: str,
          runs: int, warmup: int, cpus: str | None, runner: str,
          benchmark_binary: str | None, python: str | None, parity_dir: str | None, parity_samples: int, cooldown: float | None,
          timeout: float, report: str | None, force: bool, as_json: bool) -> None:
    """Latency and parity of exported FILES on a device, side by side (or, with --compare-peers
    MODEL, of mixdeploy's and the peers' exports of MODEL)."""
    from devices.bench import Settings, check_files
    from devices.bench import bench as run_bench
    from devices.connect import open_device

    if bool(files) == bool(peer_model):
        raise MixdeployError("give exported FILES to bench, or --compare-peers MODEL (not both)")
    if files:
        _reject_given(("precision", "checkpoint", "pretrained", "calibrate_bn", "input_size", "keep"),
                      "--compare-peers MODEL; exported FILES keep what they were exported with")
    from mixnet_deploy.models import DROPIN_PREFIX, known_models, own_network

    from devices.runners import file_format

    named = [f for f in files if (f in known_models() or f.startswith(DROPIN_PREFIX) or own_network(f))
             and not Path(f).exists() and not file_format(f)]  # a missing mixconv_x.onnx is a missing file
    if named:
        raise MixdeployError(f"{named[0]} is a model name; bench takes exported .onnx/.tflite files "
                             f"(`mixdeploy export {named[0]}` first), or --compare-peers {named[0]}")
    if runner == "benchmark_model":
        _reject_given(("python",), "--runner python")
        if peer_model:
            raise MixdeployError("--compare-peers benches ONNX files too: leave out --runner benchmark_model")
    else:
        _reject_given(("benchmark_binary",), "--runner benchmark_model")
    if report:
        from exporters.export import check_writable

        check_writable(Path(report), force, ".md")
        check_writable(Path(report).with_suffix(".png"), force)
    else:
        _reject_given(("force",), "--report PATH")

    try:
        counts = [int(t) for t in threads.split(",")]
    except ValueError:
        counts = [0]
    if min(counts) < 1:
        raise MixdeployError(f"--threads {threads!r}: give thread counts of 1 or more, like 1,2,4")
    if len(set(counts)) < len(counts):
        raise MixdeployError(f"--threads {threads!r} names a thread count twice; give each once, like 1,2,4")
    given = [Path(f).resolve() for f in files]
    if twice := next((f for i, f in enumerate(files) if given[i] in given[:i]), None):
        raise MixdeployError(f"{twice} is given twice; give each file once")
    if parity_dir:
        from quantization.calibration import MIN_IMAGES, check_folder

        check_folder(parity_dir, MIN_IMAGES if peer_model else min(parity_samples, MIN_IMAGES))  # peers calibrate on it
    settings = Settings(counts, runs, warmup, cpus, parity_dir, parity_samples, runner, benchmark_binary, cooldown,
                        timeout, python)
    kept = None
    if peer_model:  # before connecting: a typo fails at once
        from devices.compare_peers import keep_folder
        from mixnet_deploy.models import check_request

        check_request(peer_model, checkpoint, pretrained, calibrate_bn, input_size)
        kept = keep_folder(keep) if keep else None
    else:
        check_files(list(files), runner)
    with _progress(f"connecting to {device}") as step:
        if peer_model:
            from devices.compare_peers import compare_peers

            measured = compare_peers(peer_model, open_device(device), settings, precision, checkpoint, calibrate_bn,
                                     input_size, kept, pretrained, step=step)
        else:
            measured = run_bench(list(files), open_device(device), settings, step=step)
    results = measured["results"]
    if as_json:
        _echo_json(measured)
    else:
        _bench_table(measured)
    if report:  # after the results: a report that cannot be written loses none of them
        from devices.report import write_report

        try:
            written = write_report(Path(report), measured["device"], results)
        except OSError as exc:
            raise MixdeployError(f"cannot write the report {report} ({exc.strerror or exc}); the results are "
                                 "printed above") from None
        err.print("report: " + ", ".join(map(str, written)))
    # with --compare-peers a peer's file failing parity is a finding, not our failure
    failed = [r["file"] for r in results if not r["parity"]["passed"] and r.get("source", "mixdeploy") == "mixdeploy"]
    if failed:
        click.echo(f"mixdeploy: error: parity failed for {', '.join(failed)} (see the table); an int8 file out of "
                   "tolerance needs a re-quantization (more --calib images, --method percentile, --max-drop), a "
                   "float file a fresh export", err=True)
        sys.exit(1)


def _bench_table(measured: dict) -> None:
    from devices.report import delegation_line, median, number

    dev = measured["device"]
    title = f"mixdeploy bench on {dev['name']} ({dev['abi']}, {dev['os']})"
    peers = "missing_peers" in measured
    if peers:  # one precision per peer comparison: in the title, so the table fits 120 columns
        title += f", {measured['results'][0]['precision']}"
    table = Table(title=Text.assemble(title, (" EMULATED: latency is not meaningful", "red") if dev["emulated"] else ""))
    columns = (["exported by", "format", "MB", "threads", "median ms", "vs ours"] if peers else
               ["file", "precision", "MB", "threads", "median ms", "p90 ms", "peak MB"])
    for col in columns + ["top-1 agr.", "cosine", "parity"]:
        table.add_column(col, no_wrap=True)
    for r in measured["results"]:
        p = r["parity"]
        for t, lat in r["latency_by_threads"].items():
            first = t == str(measured["settings"]["threads"][0])
            cells = ([r["source"], r["format"], f"{r['size_bytes'] / 1e6:.1f}", t,
                      median(lat), f"{r['ratio_to_ours']:.2f}x" if first else ""] if peers else
                     [Path(r["file"]).name, r["precision"], f"{r['size_bytes'] / 1e6:.1f}", t, median(lat),
                      number(lat["p90"]), number(r["peak_memory_mb"], ".0f")])
            table.add_row(*cells, f"{p['top1_agreement']:.1%}", f"{p['cosine']:.5f}",
                          _verdict(p["passed"]))
    out.print(table)
    for line in dict.fromkeys(f"{r['model']}, weights {r['weights']}, {r['runtime']}" for r in measured["results"]):
        out.print(line)  # one line per model and runtime, not per file
    for line in filter(None, map(delegation_line, measured["results"])):
        out.print(line)
    for label, why in measured.get("missing_peers", {}).items():
        out.print(f"{label}: {why}", style="yellow")
    if measured.get("kept_in"):
        out.print(f"files kept in {measured['kept_in']}")


@cli.group()
def device() -> None:
    """Devices: what one is, and the virtual ARM64 device for tests and CI."""


@device.command("info")
@click.argument("spec", metavar="[DEVICE]", default="local")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def device_info_command(spec: str, as_json: bool) -> None:
    """ABI, model, OS, cores and max frequencies, governor, temperatures and free memory of DEVICE
    (local, SERIAL, adb:SERIAL or ssh:USER@HOST[:PORT]; default local)."""
    from devices.connect import open_device
    from devices.device_info import device_info

    with _progress(f"connecting to {spec}") as step, open_device(spec) as transport:  # ssh: up to 30 s
        step(f"asking {transport.name} for its facts")
        info = device_info(transport)
    if as_json:
        _echo_json(info)
        return
    freqs = ", ".join(f"cpu{c['cpu']} {c['max_khz'] / 1e6:.2f} GHz" if c["max_khz"] else f"cpu{c['cpu']}"
                      for c in info["cores"])
    out.print(_headline(info["name"], f"{info['abi']}  {info['model']}  {info['os']}",
                        ("  (emulated: latency is not meaningful)", "red") if info["emulated"] else "  (not emulated)"))
    out.print(f"cores: {freqs}; big: {info['big_cores']}; governor: {info['governor'] or 'unknown'}")
    out.print(f"free memory: {info['mem_free_mb']} MB; temperatures: "
              + (", ".join(f"{k} {v:.1f} C" for k, v in info["temps"].items()) or "not readable"))


@device.command("sim")
@click.argument("action", type=click.Choice(["build", "start", "stop", "status"]))
@click.option("--port", type=click.IntRange(1024, 65535), help="Loopback port of the device's adbd [default: 5600].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def device_sim(action: str, port: int | None, as_json: bool) -> None:
    """The virtual ARM64 device: an arm64 Debian root under QEMU user emulation with python3,
    numpy, ai-edge-litert and onnxruntime, reached by the real adb client (`adb connect`).
    build makes the root filesystem (about 2-3 minutes, cached); start builds if needed.
    Latency there is emulated; parity is real, computed by ARM kernels. Needs root."""
    from devices import sim

    if action in ("build", "status"):
        _reject_given(("port",), "start or stop")
    if action == "build":
        result = {"rootfs": str(sim.build())}
    elif action == "start":
        result = sim.start(port or sim.PORT)
    else:
        if action == "stop":
            running = sim.status()["port"]
            if port and running and port != running:
                raise MixdeployError(f"the ARM64 simulator runs on port {running}, not {port}: "
                                     "`mixdeploy device sim stop` stops it")
            sim.stop()
        result = sim.status()
    if as_json:
        _echo_json(result)
    else:
        out.print(", ".join(f"{k} {v}" for k, v in result.items()))


STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())  # a group called bare (click 8.2 and later)


class Terminated(BaseException):
    """SIGINT (Ctrl-C), SIGTERM or SIGHUP, raised in the main thread so the work unwinds: work folders
    (here and on the device) and partial output files are removed on the way out. A BaseException,
    like KeyboardInterrupt, so no `except Exception` on the way swallows it."""


def _terminate(signum: int, _frame) -> None:
    for sig in STOPS:  # a second signal must not cut the clean-up short
        if signal.getsignal(sig) is _terminate:
            signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


def _denied(exc: PermissionError) -> str:
    """What a PermissionError was refused, by the path the user gave (not our .NAME.PID.partial file)."""
    if exc.filename is None:
        return f"permission denied ({exc.strerror or exc}); check the permissions of the files and folders given"
    path = Path(os.fsdecode(exc.filename))
    if partial := re.fullmatch(r"\.(.+)\.\d+\.partial.*", path.name):
        path = path.with_name(partial.group(1))
    return f"{path}: permission denied; check the permissions of it and of its folders"


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage and input errors become one line on stderr and exit code 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # only in the main thread can handlers be set; a signal ignored already (nohup, `cmd &` in a
    # script) stays ignored, and one handled outside Python (getsignal gives None) is left alone
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in STOPS} if in_main_thread else {}
    handled = {sig: old for sig, old in previous.items() if old not in (signal.SIG_IGN, None)}
    for sig in handled:
        signal.signal(sig, _terminate)
    try:
        cli.main(args=argv, prog_name="mixdeploy", standalone_mode=False)
    except MixdeployError as exc:
        click.echo(f"mixdeploy: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except PermissionError as exc:  # a path in a folder this user may not enter, read or write
        click.echo(f"mixdeploy: error: {_denied(exc)}", err=True)
        sys.exit(2)
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "not enough memory" not in str(exc):  # PyTorch's allocator says so
            raise
        click.echo("mixdeploy: error: out of memory: use fewer images (--num-calib, --num-eval, --parity-samples) "
                   "or a smaller --input-size, or a machine with more memory", err=True)
        sys.exit(1)
    except click.exceptions.Abort:  # end of input at a prompt
        click.echo("mixdeploy: aborted", err=True)
        sys.exit(130)
    except Terminated as exc:
        signum = exc.args[0]
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            click.echo(f"mixdeploy: stopped by {signal.Signals(signum).name}", err=True)
        sys.exit(128 + signum)
    except NO_ARGS as exc:  # `mixdeploy`, `mixdeploy device`: their help, as click before 8.2 printed it
        click.echo(exc.ctx.get_help())
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)  # a usage error knows its command: point at that command's help
        click.echo(f"mixdeploy: error: {exc.format_message()} (see {ctx.command_path if ctx else 'mixdeploy'} --help)",
                   err=True)
        sys.exit(2)
    finally:  # after a stop they stay ignored: a late signal would kill the process before it exits 128+N
        for sig, old in handled.items():
            if signal.getsignal(sig) is _terminate:
                signal.signal(sig, old)


if __name__ == "__main__":
    main()
