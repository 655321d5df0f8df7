"""ONNX writer of a lowered module (torch.onnx's exporter, then checks of the written graph)."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
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
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph)
    return rewritten


def _drop_unused(graph) -> None:
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def scaled_weights(model) -> int:
    """Rewrite Mul(x, s) -> 1x1 Conv, with s one scale per channel of a batch-1 x (a squeeze-excite
    gate), as the Conv of x with its weight scaled by s: the same numbers up to rounding, without
    the Mul, the pass over x that ONNX Runtime spends on it, or the re-layout around it. Returns how
    many were rewritten."""
    from onnx import helper, numpy_helper, shape_inference

    graph = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in shape_inference.infer_shapes(model).graph.value_info}
    weights = {i.name: i for i in graph.initializer}
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    nodes, rewritten = list(graph.node), 0
    for mul in list(nodes):
        if mul.op_type != "Mul" or len(users.get(mul.output[0], [])) != 1 or mul.output[0] in outputs:
            continue
        x, scale = sorted(mul.input, key=lambda name: shapes.get(name, [0] * 4)[2:] == [1, 1])
        conv = users[mul.output[0]][0]
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        w = weights.get(conv.input[1]) if conv.op_type == "Conv" and conv.input[0] == mul.output[0] else None
        if w is None or list(w.dims[2:]) != [1, 1] or any(attrs.get("pads", [0])) or set(attrs.get("strides", [1])) != {1}:
            continue
        groups, (c_out, c_in) = attrs.get("group", 1), w.dims[:2]
        if (len(shapes.get(x, [])) != 4 or shapes[x][:2] != [1, groups * c_in] or shapes[x][2:] == [1, 1]
                or shapes.get(scale) != [1, groups * c_in, 1, 1]):
            continue
        name = conv.input[1] + "_scaled"
        grouped = numpy_helper.from_array(numpy_helper.to_array(w).reshape(groups, c_out // groups, c_in), name + "_w")
        shape = [numpy_helper.from_array(np.array(v, dtype=np.int64), name + k)
                 for k, v in (("_s", [groups, 1, c_in]), ("_shape", [c_out, c_in, 1, 1]))]
        graph.initializer.extend([grouped, *shape])
        scaling = [helper.make_node("Reshape", [scale, name + "_s"], [name + "_s3"]),
                   helper.make_node("Mul", [name + "_w", name + "_s3"], [name + "_3"]),
                   helper.make_node("Reshape", [name + "_3", name + "_shape"], [name])]
        conv.input[0], conv.input[1] = x, name
        at = nodes.index(mul)
        nodes[at:at + 1] = scaling
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph)
    return rewritten


def write_onnx(module: nn.Module, input_size: tuple[int, int, int], path: str | Path, opset: int = 18,
               dynamic_batch: bool = False, scale_weights: bool = False) -> None:
    """Export `module` (NCHW float32 input, batch 1 unless dynamic_batch) to `path`; below opset 18
    the graph is exported at 18 and converted down with onnx's version converter. scale_weights:
    fold per-channel gates into the 1x1 conv after them (`scaled_weights`; batch 1 only, float only:
    a quantizer would see those weights as activations)."""
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
    if scale_weights:
        scaled_weights(model)
    if opset < 18:
        model = onnx.version_converter.convert_version(model, opset)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
