"""ONNX int8: QDQ through onnxruntime.quantization, per-channel weights."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
CPUINFO = Path("/proc/cpuinfo")


class CalibrationReader:
    """onnxruntime.quantization's CalibrationDataReader over preprocessed images in the model's input
    layout; `set_range` gives ORT one chunk at a time."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        self.feeds = [{input_name: images[i:i + 1].astype(np.float32)} for i in range(len(images))]
        self.batches = iter(self.feeds)

    def get_next(self) -> dict | None:
        return next(self.batches, None)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.batches = iter(self.feeds[start_index:end_index])

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self):
        return iter(self.feeds)


def chunk(n: int, most: int = 8) -> int:
    """The largest chunk of at most `most` images that divides `n` (ORT requires it): the histogram
    calibrators keep every activation of a chunk in memory (mixnet_s at 224: about 75 MB an image)."""
    return max(d for d in range(1, most + 1) if n % d == 0)


def saturates_here() -> bool:
    """Whether ONNX Runtime's int8 kernels on this machine saturate on 8-bit weights: an x86 CPU
    without VNNI (read from CPUINFO; False where it cannot be read)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = CPUINFO.read_text()
    except OSError:
        return False
    return "flags" in flags and "vnni" not in flags


def quantize_onnx(float_path: Path, out_path: Path, images: np.ndarray, method: str = "minmax",
                  keep_float: list[str] | None = None, reduce_range: bool = False) -> None:
    """Static QDQ quantization of a float ONNX file, calibrated on `images` in its input layout:
    per-channel int8 weights, uint8 activations (ORT's fast U8S8 kernels on x86; int8 activations
    ran 3x slower here), `keep_float` nodes stay in float. reduce_range: 7-bit weights, for x86 CPUs
    without VNNI, whose AVX2 kernels add u8 x s8 products in pairs into saturating int16 sums
    (vpmaddubsw), which 8-bit weights overflow (mixnet_s: cosine 0.985 with VNNI, 0.960 without;
    0.983 on both with 7 bits). ARM's kernels and VNNI's do not saturate."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from exporters.onnx_export import INPUT_NAME

    prepared = out_path.with_name(out_path.name + ".prep.onnx")
    try:
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print progress to stdout (breaks --json)
            quantize_static(
                str(prepared), str(out_path), CalibrationReader(images, INPUT_NAME), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range,
                calibrate_method=getattr(CalibrationMethod, METHODS[method]), nodes_to_exclude=keep_float or [],
                # percentile: cut at each end (as the TFLite route does), not |x|'s percentile; histograms
                # merged chunk by chunk (ORT's option says MinMax, its loop serves every calibrator)
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "CalibTensorRangeSymmetric": False,
                               "CalibStridedMinMax": chunk(len(images)) if method != "minmax" else None},
            )
    finally:
        prepared.unlink(missing_ok=True)
