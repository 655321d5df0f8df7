"""Per-layer SQNR between float and quantized activations: which layers lose most."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _sqnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    err = np.sum((reference.astype(np.float64) - candidate) ** 2)
    return float(10 * np.log10(max(np.sum(reference.astype(np.float64) ** 2), 1e-30) / max(err, 1e-30)))


def onnx_layers(float_path: Path, qdq_path: Path, images: np.ndarray) -> list[dict]:
    """SQNR (dB) of every activation of the QDQ model against the float model (ORT's qdq_loss_debug)."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations, create_activation_matching, modify_model_output_intermediate_tensors)

    from .onnx_qdq import CalibrationReader

    float_aug, qdq_aug = float_path.with_suffix(".aug.onnx"), qdq_path.with_suffix(".aug.onnx")
    try:
        modify_model_output_intermediate_tensors(str(float_path), str(float_aug))
        modify_model_output_intermediate_tensors(str(qdq_path), str(qdq_aug))
        matching = create_activation_matching(collect_activations(str(qdq_aug), CalibrationReader(images, "input")),
                                              collect_activations(str(float_aug), CalibrationReader(images, "input")))
    finally:
        float_aug.unlink(missing_ok=True)
        qdq_aug.unlink(missing_ok=True)
    rows = []
    for name, pair in matching.items():
        # post_qdq: the activation as the next op sees it (quantized; a removed ReLU is the clamp)
        quant = pair.get("post_qdq") or pair.get("pre_qdq")
        if "float" in pair and quant:
            ref = np.concatenate([a.ravel() for a in pair["float"]])
            got = np.concatenate([a.ravel() for a in quant])
            rows.append({"layer": name, "sqnr_db": _sqnr(ref, got)})
    return sorted(rows, key=lambda r: r["sqnr_db"])


def tflite_layers(calibrated: bytes, images: np.ndarray) -> list[dict]:
    """SQNR (dB) of every quantized op's output against float (TF's QuantizationDebugger on the
    int8 model of a calibrated TFLite model, see tflite_int8.calibrate)."""
    from exporters.tflite_export import tensorflow

    from devices.runners import quiet_native_stderr

    from .tflite_int8 import quantize_calibrated

    tf = tensorflow()
    nhwc = images.transpose(0, 2, 3, 1).astype(np.float32)

    def dataset():
        for sample in nhwc:
            yield [sample[None]]

    options = tf.lite.experimental.QuantizationDebugOptions(layer_direct_compare_metrics={
        "sqnr_db": lambda floats, quants, scale, zero: _sqnr(np.concatenate([f.ravel() for f in floats]),
                                                              np.concatenate([(q.ravel().astype(np.float64) - zero) * scale for q in quants]))})
    with quiet_native_stderr():
        debugger = tf.lite.experimental.QuantizationDebugger(
            quant_debug_model_content=quantize_calibrated(calibrated, "float32", debug=True), debug_dataset=dataset,
            debug_options=options)
        debugger.run()
    rows = [{"layer": name, "sqnr_db": float(stats["sqnr_db"])} for name, stats in debugger.layer_statistics.items()]
    return sorted(rows, key=lambda r: r["sqnr_db"])
