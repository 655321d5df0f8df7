"""`mixdeploy info FILE`: what an exported .onnx or .tflite holds."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from devices.runners import file_format, layout_of
from mixnet_deploy.errors import MixdeployError


def _onnx(path: Path) -> dict:
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises several types
        raise MixdeployError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from None

    def tensor(v) -> dict:
        kind = v.type.WhichOneof("value")
        if kind != "tensor_type" or not v.type.tensor_type.elem_type:  # a sequence or map (skl2onnx's ZipMap)
            return {"name": v.name, "shape": None, "dtype": kind.removesuffix("_type") if kind else "unknown"}
        dims = [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        return {"name": v.name, "shape": dims, "dtype": dtype}

    if not model.graph.node:
        raise MixdeployError(f"{path} is not a readable ONNX file (it holds no graph)")
    meta = {}
    for prop in model.metadata_props:
        try:
            meta[prop.key] = json.loads(prop.value)
        except ValueError:
            meta[prop.key] = prop.value
    weights = {t.name for t in model.graph.initializer}  # listed as inputs too by files of IR version 3
    return {"ops": dict(Counter(n.op_type for n in model.graph.node).most_common()),
            "inputs": [tensor(v) for v in model.graph.input if v.name not in weights],
            "outputs": [tensor(v) for v in model.graph.output],
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "metadata": meta}


def _tflite(path: Path) -> dict:
    from .tflite_inspect import delegation, tensors

    try:
        return delegation(path) | tensors(path)
    except (ValueError, RuntimeError) as exc:
        raise MixdeployError(f"{path} is not a readable TFLite file ({str(exc).splitlines()[0][:120]})") from None


def contents(path: str | Path, fmt: str) -> dict:
    """Ops by type, input and output tensors (ONNX: the opset; TFLite: what XNNPACK takes) of a file
    in `fmt`, whatever its name (a partial file being written)."""
    report = _onnx(Path(path)) if fmt == "onnx" else _tflite(Path(path))
    return {k: v for k, v in report.items() if k != "metadata"}


def _precision(report: dict) -> str:
    """fp32, fp16 or int8, from the ops and tensors of an exported file (inspect_file's report)."""
    ops = set(report["ops"])
    dtype = report["inputs"][0]["dtype"] if report["inputs"] else None
    if ops & {"QuantizeLinear", "QUANTIZE"} or dtype in ("int8", "uint8"):
        return "int8"
    return "fp16" if "DEQUANTIZE" in ops or dtype == "float16" else "fp32"


def written_options(report: dict, input_size: tuple[int, int, int]) -> dict:
    """The export options a file of inspect_file's `report` was written with, read from its input
    tensor (and ONNX opset): input_layout, and for ONNX opset and dynamic_batch."""
    shape = report["inputs"][0]["shape"]
    options = {"input_layout": layout_of(shape, input_size)}
    if report["format"] == "onnx":
        options |= {"opset": report["opset"], "dynamic_batch": not isinstance(shape[0], int)}
    return options


def exported_format(path: str | Path) -> str:
    """onnx or tflite for an existing file with that suffix, else a MixdeployError saying what is wrong
    (without reading the file: a quick check before slow work)."""
    path = Path(path)
    if not path.is_file():
        raise MixdeployError(f"{path} {'is a directory' if path.is_dir() else 'does not exist'}; pass an exported "
                             ".onnx or .tflite file")
    fmt = file_format(path)
    if fmt is None:
        raise MixdeployError(f"{path}: mixdeploy reads .onnx and .tflite files; pass one of those")
    return fmt


# what each entry of mixdeploy's metadata is; a file whose entries are not was edited or damaged
METADATA_TYPES: dict[str, type | tuple[type, ...]] = {
    "mixdeploy.model": str, "mixdeploy.weights": str, "mixdeploy.preprocess": dict, "mixdeploy.labels": (list, type(None)),
    "mixdeploy.weights_sha256": str, "mixdeploy.code": dict, "mixdeploy.calibrated_at": list, "mixdeploy.plan": dict,
    "mixdeploy.parity": dict, "mixdeploy.quantization": dict, "mixdeploy.versions": dict}
REQUIRED = ("mixdeploy.weights", "mixdeploy.preprocess")


def _check_metadata(path: Path, meta: dict) -> None:
    """A file naming a mixdeploy model carries every entry bench and quantize rebuild it from, each of
    its type, and usable preprocessing; else one MixdeployError saying to export it again."""
    if "mixdeploy.model" not in meta:
        return
    from mixnet_deploy.plan import Plan
    from mixnet_deploy.preprocess import PreprocessConfig

    damaged = f"{path}: its mixdeploy metadata is damaged"
    for key, kind in METADATA_TYPES.items():
        if (key in meta or key in REQUIRED) and not isinstance(meta.get(key), kind):
            what = "missing" if key not in meta else f"a {type(meta[key]).__name__}"
            raise MixdeployError(f"{damaged} ({key} is {what}); export the file again")
    pre = meta["mixdeploy.preprocess"]
    try:  # its structure only: an own network may take sizes that --input-size refuses (28x28)
        size = PreprocessConfig.from_dict(pre).input_size
        if len(size) != 3 or not all(isinstance(n, int) and n > 0 for n in size):
            raise ValueError
    except (MixdeployError, TypeError, ValueError):
        raise MixdeployError(f"{damaged} (mixdeploy.preprocess {pre} is not usable); export the file again") from None
    try:
        if "mixdeploy.plan" in meta:
            Plan.from_dict(meta["mixdeploy.plan"])
    except MixdeployError as exc:
        raise MixdeployError(f"{damaged} ({exc}); export the file again") from None


def inspect_file(path: str | Path) -> dict:
    """Format, size, precision (fp32, fp16 or int8), ops by type (and XNNPACK delegation for .tflite),
    tensors and embedded metadata."""
    path = Path(path)
    fmt = exported_format(path)
    if fmt == "onnx":
        body = _onnx(path)
    else:
        from .tflite_inspect import read_metadata

        body = _tflite(path) | {"metadata": read_metadata(path)}
    _check_metadata(path, body["metadata"])
    report = {"path": str(path), "format": fmt, "size_bytes": path.stat().st_size, **body}
    return report | {"precision": _precision(report)}
