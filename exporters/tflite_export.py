"""TFLite writer: the lowered module, traced with torch.fx, rebuilt op by op as an NHWC
TensorFlow function with constant weights, then converted with the TFLite converter."""
from __future__ import annotations

import contextlib
import operator
import re
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from mixnet_deploy.conv_groups import same_pads
from mixnet_deploy.deploy_modules import BlockConv, DeployConv, ExpandedMixConv, LoweredMixConv, trace
from mixnet_deploy.errors import MixdeployError

if TYPE_CHECKING:
    import tensorflow as tf

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MAX_SPLIT = 4  # XNNPACK delegates SPLIT with 2-4 equal outputs, never SPLIT_V
MAX_CONCAT = 5  # ... and CONCATENATION with 2-5 inputs


def tensorflow() -> ModuleType:
    """TensorFlow, imported without the log lines it prints on import, and after torch._dynamo:
    torch imports triton lazily, and triton's native module crashes once TensorFlow is loaded."""
    import torch._dynamo  # noqa: F401

    from devices.runners import quiet_native_stderr

    with quiet_native_stderr():
        import tensorflow as tf
    return tf


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _padded(tf, x, pads: tuple[int, int, int, int], kh: int, kw: int, s: int, dh: int = 1):
    """x and the padding for a conv of a kh x kw kernel (rows dilated dh) with these static pads:
    "SAME" where TF's own padding equals them, else an explicit PAD (XNNPACK folds a PAD that feeds a
    conv into it) and "VALID"."""
    h, w = int(x.shape[1]), int(x.shape[2])
    if pads == (0, 0, 0, 0):
        return x, "VALID"
    if pads == same_pads(h, kh, s, dh) + same_pads(w, kw, s, 1):
        return x, "SAME"
    return tf.pad(x, [[0, 0], [pads[0], pads[1]], [pads[2], pads[3]], [0, 0]]), "VALID"


def _depthwise(tf, x, weight: torch.Tensor, s: int, padding: str, dh: int, dw: int):
    """One DEPTHWISE_CONV_2D of a (C, 1, kh, kw) weight. The raw op, because tf.nn refuses a stride
    together with a dilation, which the op and TFLite (XNNPACK too) take."""
    kernel = tf.constant(_np(weight).transpose(2, 3, 0, 1))  # (kh, kw, C, 1)
    return tf.raw_ops.DepthwiseConv2dNative(input=x, filter=kernel, strides=[1, s, s, 1], padding=padding,
                                            dilations=[1, dh, dw, 1])


def _conv(tf, x, conv: DeployConv):
    k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    x, padding = _padded(tf, x, tuple(conv.pads), (k - 1) * d + 1, (k - 1) * d + 1, s)
    if conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels:
        y = _depthwise(tf, x, conv.weight, s, padding, d, d)
    else:
        y = tf.nn.conv2d(x, tf.constant(_np(conv.weight).transpose(2, 3, 1, 0)), s, padding, dilations=d)
    return tf.nn.bias_add(y, tf.constant(_np(conv.bias)))


def _block(tf, x, block: BlockConv):
    top, bottom, left, right = block.pads
    padded, out = None, None
    for weight, piece, (i, j, h, w), own in zip(block.weights, block.pieces, block.spans, block.own_pads):
        if own is None:
            if padded is None:
                padded = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
            src, padding = padded[:, i:i + h, j:j + w, :], "VALID"
        else:
            src, padding = _padded(tf, x, own, piece.height, piece.width, block.stride, piece.step)
        y = _depthwise(tf, src, weight, block.stride, padding, piece.step, 1)
        out = y if out is None else out + y
    return tf.nn.bias_add(out, tf.constant(_np(block.bias)))


def _concat(tf, parts: list):
    while len(parts) > MAX_CONCAT:
        parts = [tf.concat(parts[i:i + MAX_CONCAT], 3) if len(parts[i:i + MAX_CONCAT]) > 1 else parts[i]
                 for i in range(0, len(parts), MAX_CONCAT)]
    return tf.concat(parts, 3) if len(parts) > 1 else parts[0]


def _split(tf, x, splits: list[int]) -> list:
    """x cut along channels: one SPLIT where XNNPACK takes it, else a slice per part."""
    if len(set(splits)) == 1 and 1 < len(splits) <= MAX_SPLIT:
        return tf.split(x, len(splits), axis=3)
    starts = np.cumsum([0] + splits)
    return [x[..., int(a):int(b)] for a, b in zip(starts[:-1], starts[1:])]


def _mixconv(tf, x, mix: LoweredMixConv):
    act = mix.out_act
    if len(mix.segments) == 1:
        return _module(tf, _module(tf, x, mix.segments[0]), act)
    return _concat(tf, [_module(tf, _module(tf, p, seg), act) for p, seg in zip(_split(tf, x, mix.splits), mix.segments)])


def _expanded(tf, x, mix: ExpandedMixConv):
    ranges = sorted(set(mix.inputs))
    if [a for a, _ in ranges] + [mix.in_channels] == [0] + [b for _, b in ranges]:  # the ranges cut the input
        parts = dict(zip(ranges, _split(tf, x, [b - a for a, b in ranges]) if len(ranges) > 1 else [x]))
    else:
        parts = {(a, b): x[..., a:b] for a, b in ranges}
    return _concat(tf, [_module(tf, _module(tf, _module(tf, _conv(tf, parts[r], expand), mix.act), seg), mix.out_act)
                        for r, expand, seg in zip(mix.inputs, mix.expands, mix.segments)])


def _module(tf, x, mod: nn.Module):
    if isinstance(mod, DeployConv):
        return _conv(tf, x, mod)
    if isinstance(mod, BlockConv):
        return _block(tf, x, mod)
    if isinstance(mod, LoweredMixConv):
        return _mixconv(tf, x, mod)
    if isinstance(mod, ExpandedMixConv):
        return _expanded(tf, x, mod)
    if isinstance(mod, (nn.Identity, nn.Dropout)):
        return x
    if isinstance(mod, nn.Sequential):
        for m in mod:
            x = _module(tf, x, m)
        return x
    act = next((f for kind, f in ACTIVATIONS.items() if isinstance(mod, kind)), None)
    if act is not None:
        return act(tf, x, getattr(mod, "approximate", "none"))
    if isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size in (1, (1, 1)):
        return tf.reduce_mean(x, [1, 2], keepdims=True)
    if isinstance(mod, nn.Flatten):
        return _flatten(tf, x)
    if isinstance(mod, nn.Linear):
        y = tf.matmul(x, tf.constant(_np(mod.weight).T))
        return y + tf.constant(_np(mod.bias)) if mod.bias is not None else y
    raise MixdeployError(f"the TFLite writer cannot translate {type(mod).__name__}; export --format onnx, or open "
                         "an issue with the model")


# activations, as modules and as functions; those without a TFLite op of their own written as the
# converter recognises them (x * relu6(x + 3) / 6: HARD_SWISH)
ACTIVATIONS = {
    nn.ReLU: lambda tf, x, _: tf.nn.relu(x),
    nn.ReLU6: lambda tf, x, _: tf.nn.relu6(x),
    nn.SiLU: lambda tf, x, _: x * tf.sigmoid(x),
    nn.Sigmoid: lambda tf, x, _: tf.sigmoid(x),
    nn.Hardswish: lambda tf, x, _: x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0),
    nn.Hardsigmoid: lambda tf, x, _: tf.nn.relu6(x + 3.0) * (1.0 / 6.0),
    nn.GELU: lambda tf, x, approximate: tf.nn.gelu(x, approximate=approximate == "tanh"),
    nn.Tanh: lambda tf, x, _: tf.tanh(x),
}
FUNCTIONS = {torch.nn.functional.relu: nn.ReLU, torch.relu: nn.ReLU, "relu": nn.ReLU,
             torch.nn.functional.relu6: nn.ReLU6, torch.nn.functional.silu: nn.SiLU,
             torch.sigmoid: nn.Sigmoid, "sigmoid": nn.Sigmoid, torch.nn.functional.hardswish: nn.Hardswish,
             torch.nn.functional.hardsigmoid: nn.Hardsigmoid, torch.nn.functional.gelu: nn.GELU,
             torch.tanh: nn.Tanh, "tanh": nn.Tanh}


def _flatten(tf, x):
    if len(x.shape) == 4 and (int(x.shape[1]), int(x.shape[2])) != (1, 1):
        raise MixdeployError("the TFLite writer can flatten only 1x1 feature maps (after global pooling)")
    return tf.reshape(x, [int(x.shape[0]), -1])


def _axes(dims, rank: int) -> list[int]:
    dims = [dims] if isinstance(dims, int) else list(dims)
    nhwc = {1: 3, 2: 1, 3: 2} if rank == 4 else {}
    return [nhwc.get(d % rank, d % rank) for d in dims]


def _function(tf, node: fx.Node, args: list, kwargs: dict):
    target = node.target
    if target in (operator.add, torch.add):
        return args[0] + args[1]
    if target in (operator.mul, torch.mul):
        return args[0] * args[1]
    if target in (torch.flatten,) or target == "flatten":
        return _flatten(tf, args[0])
    if target == "mean":
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        return tf.reduce_mean(args[0], _axes(dims, len(args[0].shape)), keepdims=keep)
    if target in FUNCTIONS:
        return ACTIVATIONS[FUNCTIONS[target]](tf, args[0], kwargs.get("approximate", "none"))
    name = getattr(target, "__name__", target)
    raise MixdeployError(f"the TFLite writer cannot translate {name}(); export --format onnx, or open an issue with "
                         "the model")


def _scope(module_path: str) -> str:
    """An absolute TF name scope for a PyTorch module path: re-entered as itself (no `_1` suffix),
    characters TF refuses in scope names replaced."""
    return re.sub(r"[^A-Za-z0-9_.>-]", "_", module_path).lstrip("_->") + "/"


@contextlib.contextmanager
def _at(where: str) -> Iterator[None]:
    """A translation error names the PyTorch module it is in."""
    try:
        yield
    except MixdeployError as exc:
        raise MixdeployError(f"{where}: {exc}") from None


def to_tf_function(module: nn.Module, input_size: tuple[int, int, int], input_layout: str = "nhwc") -> Callable:
    """An NHWC tf.function computing `module` (a lowered model), weights as constants."""
    tf = tensorflow()

    graph = trace(module)
    modules = dict(module.named_modules())
    c, h, w = input_size
    shape = [1, h, w, c] if input_layout == "nhwc" else [1, c, h, w]

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)], autograph=False)
    def forward(x):  # Python walks the graph: nothing for autograph to convert (its errors would span lines)
        if input_layout == "nchw":
            x = tf.transpose(x, [0, 2, 3, 1])
        env = {}
        for node in graph.nodes:
            args = fx.node.map_arg(node.args, lambda n: env[n.name])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
            if node.op == "placeholder":
                env[node.name] = x
            elif node.op == "get_attr":  # a module's own use of its weights, outside the layers translated
                raise MixdeployError(f"{node.target}: the TFLite writer cannot translate a parameter used in a "
                                     "forward() of your own; export --format onnx, or open an issue with the model")
            elif node.op == "call_module":
                with tf.name_scope(_scope(node.target)), _at(node.target):  # tensors named after the module
                    env[node.name] = _module(tf, args[0], modules[node.target])
            elif node.op in ("call_function", "call_method"):
                stack = list((node.meta.get("nn_module_stack") or {}).values())
                where = stack[-1][0] if stack else node.name
                with tf.name_scope(_scope(where)), _at(where):
                    env[node.name] = _function(tf, node, list(args), dict(kwargs))
            elif node.op == "output":
                return {OUTPUT_NAME: tf.identity(args[0], name=OUTPUT_NAME)}
        raise MixdeployError("the traced model has no output")

    return forward


def converter(module: nn.Module, input_size: tuple[int, int, int], fp16: bool = False, input_layout: str = "nhwc",
              representative: Callable | None = None, io_type: str = "float32") -> tf.lite.TFLiteConverter:
    """A TFLite converter for `module`: fp32, fp16 weights, or (with a representative dataset) full int8."""
    tf = tensorflow()
    forward = to_tf_function(module, input_size, input_layout)
    conv = tf.lite.TFLiteConverter.from_concrete_functions([forward.get_concrete_function()], forward)
    if fp16:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    if representative is not None:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io_type != "float32":
            conv.inference_input_type = conv.inference_output_type = getattr(tf, io_type)
    return conv


def write_tflite(module: nn.Module, input_size: tuple[int, int, int], path: str | Path, fp16: bool = False,
                 input_layout: str = "nhwc", representative: Callable | None = None, io_type: str = "float32") -> None:
    """Convert `module` to a .tflite file (see `converter`)."""
    from devices.runners import quiet_native_stderr

    conv = converter(module, input_size, fp16, input_layout, representative, io_type)
    with quiet_native_stderr():
        Path(path).write_bytes(conv.convert())
