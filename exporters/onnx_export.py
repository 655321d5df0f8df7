"""ONNX writer of a lowered module (torch.onnx's exporter, then checks of the written graph)."""
from __future__ import annotations

import contextlib
import io
import logging
import re
import textwrap
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from mixnet_deploy.errors import MixdeployError

if TYPE_CHECKING:
    import onnx

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def export_failure(exc: Exception) -> str:
    """torch.onnx.export's long report in a phrase: its exception summary and the model's line that raised."""
    lines = [line for line in (ANSI.sub("", line).strip() for line in str(exc).splitlines()) if line]
    after = {line: lines[i + 1:i + 3] for i, line in enumerate(lines)}
    summary = (after.get("## Exception summary") or lines or [type(exc).__name__])[0]
    raised = after.get("The following call raised this error:", [])
    return textwrap.shorten(summary.split(">: ", 1)[-1], 160, placeholder=" ...") + (
        f" ({' '.join(raised)})" if raised else "")


def global_average_pools(model: onnx.ModelProto) -> int:
    """Rewrite spatial ReduceMean(keepdims=1) as GlobalAveragePool: the same numbers, an op that ONNX
    Runtime keeps in its blocked NCHWc layout and every opset has. Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    shapes = _shapes(model)
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = _attrs(node)
        axes = constants.get(node.input[1]) if len(node.input) > 1 else attrs.get("axes")
        if (node.op_type == "ReduceMean" and axes is not None and attrs.get("keepdims", 1) == 1
                and len(shapes.get(node.input[0], [])) == 4  # (N, C, H, W) only: a 5-D mean is not a pool
                and sorted(int(a) % 4 for a in axes) == [2, 3]):
            pool = helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name)
            pool.metadata_props.extend(node.metadata_props)  # the PyTorch module it came from, for reports
            nodes.append(pool)
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


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _shapes(model) -> dict[str, list[int]]:
    """Every tensor's shape as shape inference (and the graph's inputs) give it; 0 for an unknown dim."""
    from onnx import shape_inference

    values = [*shape_inference.infer_shapes(model).graph.value_info, *model.graph.input]
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def scaled_weights(model: onnx.ModelProto) -> int:
    """Rewrite Mul(x, s) -> 1x1 Conv, with s one scale per channel of a batch-1 x (a squeeze-excite
    gate), as the Conv of x with its weight scaled by s: the same numbers up to rounding, without
    the Mul, the pass over x that ONNX Runtime spends on it, or the re-layout around it. A Mul that
    feeds a channel Split whose every part feeds such a Conv (a split projection) becomes a Split
    of x and one of s, each Conv scaled by its part of s, when those weights hold no more numbers
    than x (scaling larger ones costs more than the pass saved; a single Conv is always folded:
    timed both ways, it lost nothing). Returns how many gates were folded."""
    from onnx import helper

    graph = model.graph
    shapes = _shapes(model)
    weights = {i.name: i for i in graph.initializer}
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def only_user(name: str):
        return users[name][0] if len(users.get(name, [])) == 1 and name not in outputs else None

    nodes, rewritten = list(graph.node), 0
    for mul in list(nodes):
        user = only_user(mul.output[0]) if mul.op_type == "Mul" else None
        if user is None:
            continue
        x, scale = sorted(mul.input, key=lambda name: shapes.get(name, [0] * 4)[2:] == [1, 1])
        channels = shapes.get(scale, [0, 0])[1]
        if (len(shapes.get(x, [])) != 4 or shapes[x][:2] != [1, channels] or shapes[x][2:] == [1, 1]
                or shapes.get(scale) != [1, channels, 1, 1]):
            continue
        if user.op_type == "Split" and _attrs(user).get("axis", 0) in (1, -3) and user.input[0] == mul.output[0]:
            convs = [(only_user(out), out, shapes.get(out, [0, 0])[1], f"{out}_gate") for out in user.output]
            split = helper.make_node("Split", [scale, *user.input[1:]], [c[3] for c in convs], name=f"{user.output[0]}_gate")
            split.attribute.extend(user.attribute)
            scaling = [split]
        else:
            convs, scaling = [(user, mul.output[0], channels, scale)], []
        if not all(_scalable(conv, part, n, weights) for conv, part, n, _ in convs):
            continue
        if len(convs) > 1 and sum(np.prod(weights[c[0].input[1]].dims) for c in convs) > np.prod(shapes[x]):
            continue
        for conv, part, _, part_scale in convs:
            scaling += _scale(conv, part_scale, weights, graph.initializer)
        user.input[0] = x  # the Conv, or the Split, now reads x itself
        nodes.remove(mul)
        at = nodes.index(user)  # everything the scaling reads (the gate, the split sizes) comes before it
        nodes[at:at] = scaling
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph)
    return rewritten


def _scalable(conv, part: str, channels: int, weights: dict) -> bool:
    """Whether `conv` is a stride-1 unpadded 1x1 Conv of `part` (`channels` wide) with a constant weight."""
    if conv is None or conv.op_type != "Conv" or conv.input[0] != part or conv.input[1] not in weights:
        return False
    attrs = _attrs(conv)
    w = weights[conv.input[1]]
    return (list(w.dims[2:]) == [1, 1] and not any(attrs.get("pads", [0])) and set(attrs.get("strides", [1])) == {1}
            and attrs.get("group", 1) * w.dims[1] == channels)


def _scale(conv, scale: str, weights: dict, initializers) -> list:
    """Rewire `conv` (see _scalable) to its weight scaled per input channel by `scale` (1, C, 1, 1);
    returns the nodes that compute that weight."""
    from onnx import helper, numpy_helper

    w = weights[conv.input[1]]
    groups = _attrs(conv).get("group", 1)
    c_out, c_in = w.dims[:2]
    name = conv.output[0] + "_weight"  # unique even when two convs share a weight
    conv.input[1] = name
    if groups == 1:  # (c_out, c_in, 1, 1) x (1, c_in, 1, 1)
        return [helper.make_node("Mul", [w.name, scale], [name])]
    initializers.extend([numpy_helper.from_array(numpy_helper.to_array(w).reshape(groups, c_out // groups, c_in), name + "_w"),
                         *(numpy_helper.from_array(np.array(v, dtype=np.int64), name + k)
                           for k, v in (("_s", [groups, 1, c_in]), ("_shape", [c_out, c_in, 1, 1])))])
    return [helper.make_node("Reshape", [scale, name + "_s"], [name + "_s3"]),
            helper.make_node("Mul", [name + "_w", name + "_s3"], [name + "_3"]),
            helper.make_node("Reshape", [name + "_3", name + "_shape"], [name])]


def opset_17(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (opset 18) at opset 17. onnx's version converter has no 18 -> 17 adapter for Split or
    Pad, so the ops whose schema changed at 18 are rewritten here: Split's num_outputs becomes split
    sizes, a Reduce's axes input becomes its attribute, Pad must have no axes input; any other op
    changed at 18 is refused. Every other op reads the same at 17."""
    from onnx import defs, helper, numpy_helper

    from mixnet_deploy.errors import MixdeployError

    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    shapes = _shapes(model)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or defs.get_schema(node.op_type, 18).since_version < 18:
            continue
        attrs = {a.name: a for a in node.attribute}
        reduce = node.op_type.startswith("Reduce") and "noop_with_empty_axes" not in attrs
        if node.op_type == "Split" and "num_outputs" in attrs:
            n, axis = attrs["num_outputs"].i, attrs["axis"].i if "axis" in attrs else 0
            dim = shapes.get(node.input[0], [0] * 8)[axis]
            if dim <= 0:
                raise MixdeployError(f"cannot write Split ({node.name}) of an unknown size at opset 17; use --opset 18")
            size = -(-dim // n)  # opset 18's rule: equal parts, the last one smaller
            name = node.output[0] + "_sizes"
            graph.initializer.append(numpy_helper.from_array(np.array([size] * (n - 1) + [dim - size * (n - 1)], np.int64), name))
            node.input[1:] = [name]
            node.attribute.remove(attrs["num_outputs"])
        elif reduce and len(node.input) > 1 and node.input[1] in constants:
            node.attribute.append(helper.make_attribute("axes", [int(a) for a in constants[node.input[1]]]))
            del node.input[1:]
        elif not (node.op_type == "Split" or (node.op_type == "Pad" and len(node.input) < 4) or (reduce and len(node.input) == 1)):
            raise MixdeployError(f"cannot write {node.op_type} ({node.name}) at opset 17; use --opset 18")
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = 17
    _drop_unused(graph)
    return model


def nhwc_input(model: onnx.ModelProto) -> None:
    """Make the NCHW graph input NHWC: the input takes (N, H, W, C) and one Transpose feeds the graph."""
    from onnx import TensorShapeProto, helper

    graph = model.graph
    shape, nchw = graph.input[0].type.tensor_type.shape, TensorShapeProto()
    nchw.CopyFrom(shape)
    for i, source in enumerate((0, 2, 3, 1)):
        shape.dim[i].CopyFrom(nchw.dim[source])
    inner = f"{INPUT_NAME}_nchw"
    for node in graph.node:
        node.input[:] = [inner if name == INPUT_NAME else name for name in node.input]
    graph.node.insert(0, helper.make_node("Transpose", [INPUT_NAME], [inner], name="input_to_nchw", perm=[0, 3, 1, 2]))


def check_opset(opset: int) -> None:
    """A usage error unless `opset` is one mixdeploy writes: 17 up to the newest the installed onnx knows."""
    import onnx

    from mixnet_deploy.errors import MixdeployError

    newest = onnx.defs.onnx_opset_version()
    if not 17 <= opset <= newest:
        raise MixdeployError(f"--opset {opset}: the installed onnx {onnx.__version__} knows opsets up to {newest}; "
                             f"give 17 to {newest}")


def write_onnx(module: nn.Module, input_size: tuple[int, int, int], path: str | Path, opset: int = 18,
               dynamic_batch: bool = False, scale_weights: bool = False, input_layout: str = "nchw") -> None:
    """Export `module` (float32 input, NCHW or with input_layout "nhwc" NHWC; batch 1 unless
    dynamic_batch) to `path` at `opset` >= 17 (17: exported at 18, then `opset_17`). scale_weights:
    fold per-channel gates into the 1x1 conv after them (`scaled_weights`; batch 1 only, float only:
    a quantizer would see those weights as activations)."""
    import onnx

    check_opset(opset)
    example = (torch.randn(1, *input_size),)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
    converter_log = logging.getLogger("onnxscript.version_converter")  # a notice on stderr for opsets above 18
    level = converter_log.level
    from devices.runners import quiet_native_stderr

    # torch.export logs a failed capture's graphs on stderr: the one line below says what failed
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet_native_stderr():
        warnings.simplefilter("ignore")
        converter_log.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                module.eval(), example, dynamo=True, opset_version=max(opset, 18), input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=dynamic, external_data=False, optimize=True,
            )
        except torch.onnx.OnnxExporterError as exc:
            from torch.onnx._internal.exporter._errors import TorchExportError

            if isinstance(exc, TorchExportError):
                raise MixdeployError(f"torch.onnx.export cannot capture this model: {export_failure(exc)}; ONNX "
                                     "export needs a forward that torch.export follows (no Python branch on a "
                                     "tensor's value: torch.where or torch.cond instead)") from None
            raise MixdeployError(f"torch.onnx.export failed: {export_failure(exc)}; --format tflite may export "
                                 "the model") from None
        finally:
            converter_log.setLevel(level)
    model = program.model_proto
    global_average_pools(model)
    if scale_weights:
        scaled_weights(model)
    if input_layout == "nhwc":
        nhwc_input(model)
    if opset == 17:
        model = opset_17(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise MixdeployError(f"the ONNX graph written is not valid ({str(exc).splitlines()[0]}): please open an "
                             "issue with the model; --format tflite may export it") from None
    onnx.save(model, str(path))
