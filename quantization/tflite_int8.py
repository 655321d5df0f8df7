"""TFLite int8: full-integer quantization by the TFLite converter, calibrated on real images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from exporters.tflite_export import write_tflite


def quantize_tflite(module: nn.Module, input_size: tuple[int, int, int], out_path: Path, images: np.ndarray,
                    io_type: str = "int8", input_layout: str = "nhwc") -> None:
    """Per-channel int8 weights and int8 activations of a lowered module; io per `io_type`."""
    nhwc = images.transpose(0, 2, 3, 1) if input_layout == "nhwc" else images

    def representative():
        for sample in nhwc:
            yield [sample[None].astype(np.float32)]

    write_tflite(module, input_size, out_path, input_layout=input_layout, representative=representative,
                 io_type=io_type)
