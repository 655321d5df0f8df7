"""TFLite int8: full-integer quantization by the TFLite converter, calibrated on real images.

Two steps, so the activation ranges can be chosen between them: the converter records every
activation's min/max over the calibration images (a float model carrying those ranges), then its
quantizer turns that model into int8. With the percentile method the ranges are clipped first, as
ONNX Runtime's percentile calibrator does: (100 - PERCENTILE) / 2 % of the values cut at each end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from exporters.tflite_export import converter, converting, tensorflow

PERCENTILE = 99.999  # ONNX Runtime's default for its percentile calibrator
BINS = 2048  # histogram bins per activation (ONNX Runtime uses 2048 for percentile)


def calibrate(module: nn.Module, input_size: tuple[int, int, int], samples: np.ndarray, method: str = "minmax",
              input_layout: str = "nhwc") -> bytes:
    """The float TFLite model of a lowered module, input in `input_layout`, with each activation's
    range recorded over the calibration `samples` (in that layout): min/max, or clipped to
    percentiles with method "percentile"."""

    def representative():
        for sample in samples:
            yield [sample[None].astype(np.float32)]

    conv = converter(module, input_size, input_layout=input_layout, representative=representative)
    conv._experimental_calibrate_only = True  # noqa: SLF001 (the converter's own two-step path, as its debugger uses)
    with converting():
        calibrated = conv.convert()
    return _clip_to_percentile(calibrated, samples) if method == "percentile" else calibrated


def _clip_to_percentile(calibrated: bytes, samples: np.ndarray) -> bytes:
    """`calibrated` with every recorded range narrowed to the PERCENTILE of its values: one
    histogram per activation between its recorded min and max, filled by running the images."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(calibrated))
    ranged = {i: t.quantization for i, t in enumerate(model.subgraphs[0].tensors)
              if t.quantization is not None and t.quantization.min is not None and len(t.quantization.min) == 1}
    interpreter = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    first = interpreter.get_input_details()[0]["index"]
    counts = {i: np.zeros(BINS, np.int64) for i in ranged}
    for sample in samples:
        interpreter.set_tensor(first, sample[None].astype(np.float32))
        interpreter.invoke()
        for i, q in ranged.items():
            lo, hi = q.min[0], q.max[0]
            scaled = (interpreter.get_tensor(i).ravel() - lo) * (BINS / max(hi - lo, 1e-12))
            counts[i] += np.bincount(np.clip(scaled.astype(np.int64), 0, BINS - 1), minlength=BINS)
    cut = (100 - PERCENTILE) / 200
    for i, q in ranged.items():
        cdf = np.cumsum(counts[i]) / counts[i].sum()
        edges = np.linspace(q.min[0], q.max[0], BINS + 1)
        q.min = [float(min(0.0, edges[np.searchsorted(cdf, cut)]))]
        q.max = [float(max(0.0, edges[np.searchsorted(cdf, 1 - cut) + 1]))]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def quantize_calibrated(calibrated: bytes, io_type: str = "int8", float_ops: list[str] | None = None,
                        debug: bool = False) -> bytes:
    """The int8 model (per-channel weights, int8 activations) of a calibrated model; ops of the types
    in `float_ops` stay float; `debug` adds the numeric-verify ops TF's QuantizationDebugger reads."""
    from tensorflow.lite.python.convert import mlir_quantize

    io = getattr(tensorflow(), io_type)
    with converting():
        return mlir_quantize(calibrated, input_data_type=io, output_data_type=io, enable_numeric_verify=debug,
                             denylisted_ops=list(float_ops or []))


def quantize_tflite(module: nn.Module, input_size: tuple[int, int, int], out_path: Path, images: np.ndarray,
                    io_type: str = "int8", method: str = "minmax") -> None:
    """Write the int8 TFLite model (NHWC input) of a lowered module calibrated on the NCHW `images`."""
    calibrated = calibrate(module, input_size, images.transpose(0, 2, 3, 1), method)
    Path(out_path).write_bytes(quantize_calibrated(calibrated, io_type))
