"""ONNX writer of a lowered module (torch.onnx's exporter, then checks of the written graph)."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 17


def write_onnx(module: nn.Module, input_size: tuple[int, int, int], path: str | Path, opset: int = 18,
               dynamic_batch: bool = False) -> None:
    """Export `module` (NCHW float32 input, batch 1 unless dynamic_batch) to `path`."""
    import onnx

    example = (torch.randn(1, *input_size),)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), example, dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes=dynamic, external_data=False, optimize=True,
        )
    model = program.model_proto
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
