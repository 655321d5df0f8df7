"""TFLite int8: full-integer quantization by the TFLite converter, calibrated on real images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from exporters.tflite_export import write_tflite


def quantize_tflite(module: nn.Module, input_size: tuple[int, int, int], out_path: Path, images: np.ndarray,
                    io_type: str = "int8", input_layout: str = "nhwc", float_ops: list[str] | None = None) -> None:
    """Per-channel int8 weights and int8 activations of a lowered module; io per `io_type`; ops of
    the types in `float_ops` stay in float (float io then)."""
    nhwc = images.transpose(0, 2, 3, 1) if input_layout == "nhwc" else images

    def representative():
        for sample in nhwc:
            yield [sample[None].astype(np.float32)]

    if not float_ops:
        write_tflite(module, input_size, out_path, input_layout=input_layout, representative=representative,
                     io_type=io_type)
        return
    from devices.runners import quiet_native_stderr
    from exporters.tflite_export import converter, tensorflow

    tf = tensorflow()
    conv = converter(module, input_size, input_layout=input_layout, representative=representative)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops))
    with quiet_native_stderr():
        debugger = tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=representative,
                                                             debug_options=options)
        Path(out_path).write_bytes(debugger.get_nondebug_quantized_model())
