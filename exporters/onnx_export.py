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


def global_average_pools(model) -> int:
    """Rewrite spatial ReduceMean(keepdims=1) as GlobalAveragePool: the same numbers, an op that ONNX
    Runtime keeps in its blocked NCHWc layout and every opset has. Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axes = constants.get(node.input[1]) if len(node.input) > 1 else attrs.get("axes")
        if (node.op_type == "ReduceMean" and axes is not None and attrs.get("keepdims", 1) == 1
                and sorted(int(a) % 4 for a in axes) == [2, 3]):
            nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name))
            rewritten += 1
        else:
            nodes.append(node)
    used = {i for n in nodes for i in n.input}
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return rewritten


def write_onnx(module: nn.Module, input_size: tuple[int, int, int], path: str | Path, opset: int = 18,
               dynamic_batch: bool = False) -> None:
    """Export `module` (NCHW float32 input, batch 1 unless dynamic_batch) to `path`; below opset 18
    the graph is exported at 18 and converted down with onnx's version converter."""
    import onnx

    example = (torch.randn(1, *input_size),)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), example, dynamo=True, opset_version=max(opset, 18), input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes=dynamic, external_data=False, optimize=True,
        )
    model = program.model_proto
    global_average_pools(model)
    if opset < 18:
        model = onnx.version_converter.convert_version(model, opset)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
