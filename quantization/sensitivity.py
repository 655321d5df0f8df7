"""Per-layer SQNR between float and quantized activations: which layers lose most."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Callable

import numpy as np

from mixnet_deploy.parity import sqnr_db


def _worst_per_module(sqnr: dict[str, float], module_of: Callable[[str], str]) -> list[dict]:
    """Rows {layer: PyTorch module, sqnr_db: its worst tensor's SQNR}, worst first."""
    worst: dict[str, float] = {}
    for tensor, value in sqnr.items():
        module = module_of(tensor)
        worst[module] = min(value, worst.get(module, value))
    return [{"layer": m, "sqnr_db": v} for m, v in sorted(worst.items(), key=lambda item: item[1])]


def onnx_layers(float_path: Path, qdq_path: Path, images: np.ndarray, leaves: set[str]) -> list[dict]:
    """SQNR (dB) of the QDQ model's activations against the float model's on `images` in their input
    layout (ORT's qdq_loss_debug), per PyTorch module: torch.onnx records each node's module path in
    its metadata, and a node inside one of `leaves` (the modules the TFLite writer translates whole)
    counts as that module."""
    import onnx

    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations, create_activation_matching, modify_model_output_intermediate_tensors)

    from exporters.onnx_export import INPUT_NAME

    from .onnx_qdq import CalibrationReader

    float_aug, qdq_aug = float_path.with_suffix(".aug.onnx"), qdq_path.with_suffix(".aug.onnx")
    try:
        modify_model_output_intermediate_tensors(str(float_path), str(float_aug))
        modify_model_output_intermediate_tensors(str(qdq_path), str(qdq_aug))
        matching = create_activation_matching(collect_activations(str(qdq_aug), CalibrationReader(images, INPUT_NAME)),
                                              collect_activations(str(float_aug), CalibrationReader(images, INPUT_NAME)))
    finally:
        float_aug.unlink(missing_ok=True)
        qdq_aug.unlink(missing_ok=True)
    sqnr = {}
    for name, pair in matching.items():
        # post_qdq: the activation as the next op sees it (quantized; a removed ReLU is the clamp)
        quant = pair.get("post_qdq") or pair.get("pre_qdq")
        if "float" in pair and quant:
            sqnr[name] = sqnr_db(np.concatenate([a.ravel() for a in pair["float"]]),
                               np.concatenate([a.ravel() for a in quant]))
    modules = {}  # tensor -> the module path of the node that wrote it (its name scopes end in the op's name)
    for node in onnx.load(str(float_path)).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        paths = [s for s in ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))[:-1] if s]
        if paths:
            modules.update(dict.fromkeys(node.output, next((s for s in paths if s in leaves), paths[-1])))
    return _worst_per_module(sqnr, lambda t: modules.get(t, t))


def tflite_layers(calibrated: bytes, samples: np.ndarray, float_ops: list[str] | None = None) -> list[dict]:
    """SQNR (dB) of the quantized ops' outputs against float on `samples` in the model's input layout
    (TF's QuantizationDebugger on the int8 model of a calibrated TFLite model, see
    tflite_int8.calibrate, with the op types `float_ops` kept in float as in the file), per PyTorch
    module (the TFLite writer names each tensor's scope after its module:
    NumericVerify/blocks.1.0.conv_dw/...:N)."""
    from exporters.tflite_export import tensorflow

    from devices.runners import quiet_native_stderr

    from .tflite_int8 import quantize_calibrated

    tf = tensorflow()

    def dataset():
        for sample in samples.astype(np.float32):
            yield [sample[None]]

    options = tf.lite.experimental.QuantizationDebugOptions(layer_direct_compare_metrics={
        "sqnr_db": lambda floats, quants, scale, zero: sqnr_db(np.concatenate([f.ravel() for f in floats]),
                                                              np.concatenate([(q.ravel().astype(np.float64) - zero) * scale for q in quants]))})
    with quiet_native_stderr():
        debugger = tf.lite.experimental.QuantizationDebugger(
            quant_debug_model_content=quantize_calibrated(calibrated, "float32", float_ops, debug=True),
            debug_dataset=dataset,
            debug_options=options)
        debugger.run()
    return _worst_per_module({name: float(stats["sqnr_db"]) for name, stats in debugger.layer_statistics.items()},
                             lambda t: t.removeprefix("NumericVerify/").split(";")[0].rpartition("/")[0]
                             or "output")  # the one tensor outside every module's scope: the logits
