"""TFLite writer: the lowered module, traced with torch.fx, rebuilt op by op as an NHWC
TensorFlow function with constant weights, then converted with the TFLite converter."""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools
import operator
import re
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from mixnet_deploy.conv_groups import batchnorm_affine, same_pads
from mixnet_deploy.deploy_modules import BlockConv, DeployConv, ExpandedMixConv, LoweredMixConv, Untraceable, trace
from mixnet_deploy.errors import MixdeployError

if TYPE_CHECKING:
    import tensorflow as tf

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MAX_SPLIT = 4  # XNNPACK delegates SPLIT with 2-4 equal outputs, never SPLIT_V
MAX_CONCAT = 5  # ... and CONCATENATION with 2-5 inputs
GLOBAL_POOL = (1, (1, 1), [1, 1])  # adaptive pooling's output sizes that mean global average pooling


def tensorflow() -> ModuleType:
    """TensorFlow, imported without the log lines it prints on import, and after torch._dynamo:
    torch imports triton lazily, and triton's native module crashes once TensorFlow is loaded."""
    import torch._dynamo  # noqa: F401

    from devices.runners import quiet_native_stderr

    with quiet_native_stderr():
        import tensorflow as tf
    return tf


@contextlib.contextmanager
def converting() -> Iterator[None]:
    """Around a TFLite converter call: its native logs silenced, its failure one line."""
    from tensorflow.lite.python.convert_phase import ConverterError

    from devices.runners import quiet_native_stderr

    try:
        with quiet_native_stderr():
            yield
    except ConverterError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "no reason given")
        raise MixdeployError(f"the TFLite converter failed ({first[:200]}): please open an issue with the model; "
                             "--format onnx may export it") from None


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


def _split(tf, x, splits: list[int], axis: int = 3) -> list:
    """x cut along `axis` (channels by default): one SPLIT where XNNPACK takes it, else a slice per part."""
    if len(set(splits)) == 1 and 1 < len(splits) <= MAX_SPLIT:
        return tf.split(x, len(splits), axis=axis)
    starts = np.cumsum([0] + splits)
    return [x[(slice(None),) * axis + (slice(int(a), int(b)),)] for a, b in itertools.pairwise(starts)]


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
    if isinstance(mod, (nn.Identity, nn.modules.dropout._DropoutNd)):  # dropout of every kind: eval mode
        return x
    if isinstance(mod, nn.Sequential):
        for m in mod:
            x = _module(tf, x, m)
        return x
    act = _activation(mod)
    if act is not None:
        return act(tf, x, mod)
    if isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size in GLOBAL_POOL:
        return tf.reduce_mean(x, [1, 2], keepdims=True)
    if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
        return _pool(tf, x, mod)
    if isinstance(mod, nn.BatchNorm2d):
        from timm.layers import BatchNormAct2d  # imported here: reading a .tflite file needs no timm (2 s)

        x = _batchnorm(tf, x, mod)  # timm's BatchNormAct2d adds its dropout (none in eval) and activation
        return _module(tf, x, mod.act) if isinstance(mod, BatchNormAct2d) else x
    if isinstance(mod, nn.Flatten):
        return _flatten(tf, x, mod.start_dim, mod.end_dim)
    if isinstance(mod, nn.Linear):
        return _linear(tf, x, mod.weight, mod.bias)
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
    nn.GELU: lambda tf, x, mod: tf.nn.gelu(x, approximate=mod.approximate == "tanh"),
    nn.Tanh: lambda tf, x, _: tf.tanh(x),
    nn.LeakyReLU: lambda tf, x, mod: tf.nn.leaky_relu(x, alpha=mod.negative_slope),
    nn.ELU: lambda tf, x, mod: tf.nn.relu(x) + mod.alpha * tf.minimum(tf.nn.elu(x), 0.0),
    nn.PReLU: lambda tf, x, mod: tf.nn.relu(x) - tf.nn.relu(-x) * _prelu_weight(tf, x, mod),
    nn.Softmax: lambda tf, x, mod: tf.nn.softmax(x, axis=_axes(_softmax_dim(mod.dim, len(x.shape)), len(x.shape))[0]),
}
# the activations as written for int8: the converter fuses x * relu6(x + 3) / 6 into HARD_SWISH, which
# XNNPACK does not take in int8 (LiteRT 2.3: the graph split around every one); written so, hard-swish
# stays an ADD and MULs it takes (average pooling likewise: _average)
INT8_ACTIVATIONS = {**ACTIVATIONS, nn.Hardswish: lambda tf, x, _: tf.nn.relu6(x + 3.0) * (x * (1.0 / 6.0))}
_FOR_INT8 = contextvars.ContextVar("for_int8", default=False)  # set while a converter for int8 traces
F = torch.nn.functional


def _activation(mod: nn.Module) -> Callable | None:
    """How an activation module is written (its int8 form while tracing for int8), or None."""
    return next((f for kind, f in (INT8_ACTIVATIONS if _FOR_INT8.get() else ACTIVATIONS).items()
                 if isinstance(mod, kind)), None)


def _prelu_weight(tf, x, mod: nn.PReLU):
    """PReLU's slopes, per channel: the last axis of an NHWC map or of (batch, features)."""
    if mod.num_parameters > 1 and len(x.shape) not in (2, 4):
        raise MixdeployError(f"the TFLite writer takes a PReLU of {mod.num_parameters} slopes on (batch, features) "
                             "or feature maps only")
    return tf.constant(_np(mod.weight))


def _softmax_dim(dim: int | None, rank: int) -> int:
    """softmax's dim; without one, PyTorch's implicit choice."""
    return dim if dim is not None else 0 if rank in (0, 1, 3) else 1
FUNCTIONS = {F.relu: nn.ReLU, torch.relu: nn.ReLU, "relu": nn.ReLU, F.relu6: nn.ReLU6, F.silu: nn.SiLU,
             torch.sigmoid: nn.Sigmoid, "sigmoid": nn.Sigmoid, F.hardswish: nn.Hardswish,
             F.hardsigmoid: nn.Hardsigmoid, F.gelu: nn.GELU, torch.tanh: nn.Tanh, "tanh": nn.Tanh,
             F.leaky_relu: nn.LeakyReLU, F.elu: nn.ELU, F.softmax: nn.Softmax, torch.softmax: nn.Softmax,
             "softmax": nn.Softmax}
POOLS = {F.max_pool2d: nn.MaxPool2d, F.avg_pool2d: nn.AvgPool2d}


def _pool_pads(mod: nn.MaxPool2d | nn.AvgPool2d, h: int, w: int) -> tuple[int, int, int]:
    """(kernel, stride, pad) of a square pooling window, or one line naming what is not."""
    k, s, p = (v if isinstance(v, int) else v[0] if len(set(v)) == 1 else None
               for v in (mod.kernel_size, mod.stride or mod.kernel_size, mod.padding))
    if None in (k, s, p) or getattr(mod, "dilation", 1) not in (1, (1, 1)) or getattr(mod, "return_indices", False) \
            or getattr(mod, "divisor_override", None):
        raise MixdeployError(f"the TFLite writer translates square {type(mod).__name__} windows without dilation, "
                             "indices or divisor_override only")
    out_h, out_w = ((n + 2 * p - k) // s + 1 for n in (h, w))
    if mod.ceil_mode and any((n + 2 * p - k) % s and (o * s - p) < n for n, o in ((h, out_h), (w, out_w))):
        raise MixdeployError(f"the TFLite writer cannot translate {type(mod).__name__}(ceil_mode=True) at this "
                             "input size, where it adds a partial window; use ceil_mode=False")
    return k, s, p


def _pool(tf, x, mod: nn.MaxPool2d | nn.AvgPool2d):
    """MAX_POOL_2D or AVERAGE_POOL_2D. PyTorch's max pooling pads with -inf: here the edge rows and
    columns are repeated instead (every window reaching the padding also holds the edge it copies:
    exact); average pooling counting the padding pads zeros."""
    h, w = int(x.shape[1]), int(x.shape[2])
    k, s, p = _pool_pads(mod, h, w)
    pool = tf.nn.max_pool2d if isinstance(mod, nn.MaxPool2d) else lambda *a: _average(tf, *a)
    if p == 0:
        return pool(x, k, s, "VALID")
    if same_pads(h, k, s, 1) + same_pads(w, k, s, 1) == (p, p, p, p) and (pool is tf.nn.max_pool2d
                                                                          or not mod.count_include_pad):
        return pool(x, k, s, "SAME")  # TF's SAME pooling leaves the padding out: -inf for max
    if pool is tf.nn.max_pool2d:
        for axis in (1, 2):
            edge = [x[:, :1] if axis == 1 else x[:, :, :1]] * p, [x[:, -1:] if axis == 1 else x[:, :, -1:]] * p
            x = tf.concat(edge[0] + [x] + edge[1], axis)
        return pool(x, k, s, "VALID")
    if not mod.count_include_pad:
        raise MixdeployError("the TFLite writer cannot translate AvgPool2d(count_include_pad=False) with this "
                             "padding at this input size")
    return pool(tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]]), k, s, "VALID")


def _average(tf, x, k: int, s: int, padding: str):
    """AVERAGE_POOL_2D; for int8 (XNNPACK takes no int8 AVERAGE_POOL_2D) a depthwise conv of 1/k^2
    weights, scaled where a SAME window reaches the padding by k^2 / its pixels inside the map, as TF's
    SAME average leaves the padding out."""
    if not _FOR_INT8.get():
        return tf.nn.avg_pool2d(x, k, s, padding)
    weight = np.full((k, k, int(x.shape[3]), 1), 1.0 / k**2, np.float32)
    y = tf.nn.depthwise_conv2d(x, tf.constant(weight), [1, s, s, 1], padding)
    if padding == "VALID":
        return y
    inside = []  # per axis: how many of each window's k pixels lie inside the map
    for n, out in ((int(x.shape[1]), int(y.shape[1])), (int(x.shape[2]), int(y.shape[2]))):
        starts = np.arange(out) * s - max((out - 1) * s + k - n, 0) // 2
        inside.append(np.minimum(starts + k, n) - np.maximum(starts, 0))
    scale = k**2 / np.outer(*inside)
    return y if np.all(scale == 1) else y * tf.constant(scale[None, :, :, None].astype(np.float32))


def _batchnorm(tf, x, bn: nn.BatchNorm2d):
    """A BatchNorm not folded into a conv (eval mode, running statistics) as one scale and shift."""
    if bn.running_var is None:
        raise MixdeployError("the TFLite writer cannot translate a BatchNorm2d without running statistics")
    scale, shift = batchnorm_affine(bn)
    return x * tf.constant(_np(scale)) + tf.constant(_np(shift))


def _linear(tf, x, weight: torch.Tensor, bias: torch.Tensor | None):
    y = tf.matmul(x, tf.constant(_np(weight).T))
    return y + tf.constant(_np(bias)) if bias is not None else y


def _flatten(tf, x, start: int = 1, end: int = -1):
    """(N, H, W, C) -> (N, H*W*C): in NHWC order, which a Linear reading it takes by permuting its weight.
    Into (batch, features) only: start 1, end the last axis."""
    rank = len(x.shape)
    if (start % rank, end % rank) != (min(1, rank - 1), rank - 1):
        raise MixdeployError("the TFLite writer flattens into (batch, features) only: flatten(x, 1)")
    return tf.reshape(x, [int(x.shape[0]), -1])


def _hwc_weight(weight: torch.Tensor, chw: tuple[int, int, int]) -> torch.Tensor:
    """A Linear weight over NCHW-flattened features, reordered for NHWC-flattened ones."""
    c, h, w = chw
    return weight.reshape(-1, c, h, w).permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _axes(dims, rank: int) -> list[int]:
    dims = [dims] if isinstance(dims, int) else list(dims)
    nhwc = {1: 3, 2: 1, 3: 2} if rank == 4 else {}
    return [nhwc.get(d % rank, d % rank) for d in dims]


def _nchw(x) -> tuple[int, ...]:
    """A tensor's shape as PyTorch sees it."""
    shape = tuple(int(n) for n in x.shape)
    return (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else shape


def _index(tf, x, index):
    """x[index] for an NCHW index of slices, and ints where the axis dropped keeps the others' order
    (any axis of a tensor of other rank than 4; of a 4-D one, channels only)."""
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, (slice, int)) for i in index) or len(index) > len(x.shape):
        raise MixdeployError("the TFLite writer takes tensor indices of slices and ints only")
    if len(x.shape) == 4:
        index = index + (slice(None),) * (4 - len(index))
        if any(isinstance(i, int) for i in (index[0], *index[2:])):
            raise MixdeployError("the TFLite writer takes an int index of a feature map on its channel axis only")
        index = (index[0], index[2], index[3], index[1])
    # an int as a one-wide slice, its axis reshaped away: XNNPACK leaves a STRIDED_SLICE dropping one out
    y = x[tuple(slice(i, i + 1 or None) if isinstance(i, int) else i for i in index)]
    kept = [int(n) for n, i in zip(y.shape, index + (slice(None),) * (len(y.shape) - len(index)))
            if not isinstance(i, int)]
    return tf.reshape(y, kept) if len(kept) < len(y.shape) else y


def _arg(args: list, kwargs: dict, i: int, name: str, default=None):
    """A call's i-th argument, given by position or by name."""
    return args[i] if len(args) > i else kwargs.get(name, default)


def _sizes(size, dim: int, x, chunks: bool = False) -> list[int]:
    """torch.split's (a size or sizes) or torch.chunk's (a count) parts along `dim`, as sizes."""
    n = _nchw(x)[dim]
    if isinstance(size, int):
        size = -(-n // size) if chunks else size
        return [min(size, n - a) for a in range(0, n, size)]
    return list(size)


def _mean(tf, x, dims, keep: bool):
    """x.mean(dims): of a feature map, over axes whose removal leaves the others in PyTorch's order
    (channels, or both rows and columns, among them), or keeping them."""
    rank = len(x.shape)
    dims = sorted({d % rank for d in ([dims] if isinstance(dims, int) else dims or range(rank))})
    if rank == 4 and not keep and 1 not in dims and not {2, 3} <= set(dims):
        raise MixdeployError("the TFLite writer averages a feature map over rows or columns alone only with "
                             "keepdim=True")
    return tf.reduce_mean(x, _axes(dims, rank), keepdims=keep)


def _reshape(tf, x, shape: list):
    """view/reshape: into (batch, features) only, the flatten before a classifier."""
    shape = list(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else list(shape)
    n = int(np.prod(x.shape))
    if len(shape) == 2 and shape[0] in (-1, int(x.shape[0])) and shape[1] in (-1, n // int(x.shape[0])):
        return _flatten(tf, x)
    raise MixdeployError(f"the TFLite writer reshapes into (batch, features) only, not {tuple(shape)}")


def _as_module(kind: type[nn.Module], args: list, kwargs: dict) -> nn.Module:
    """The module computing what a function call does (F.leaky_relu(x, 0.2): nn.LeakyReLU(0.2)); the
    function's own keywords (inplace, _stacklevel) dropped."""
    accepted = inspect.signature(kind).parameters
    try:
        return kind(*args, **{k: v for k, v in kwargs.items() if k in accepted})
    except (TypeError, ValueError) as exc:
        raise MixdeployError(f"the TFLite writer cannot translate {kind.__name__} of {list(args)} {kwargs}: "
                             f"{exc}") from None


ARITHMETIC = {operator.add: operator.add, torch.add: operator.add, "add": operator.add,
              operator.sub: operator.sub, torch.sub: operator.sub, "sub": operator.sub,
              operator.mul: operator.mul, torch.mul: operator.mul, "mul": operator.mul,
              operator.truediv: operator.truediv, torch.div: operator.truediv, "div": operator.truediv,
              operator.floordiv: operator.floordiv}
FLATTENS, RESHAPES = (torch.flatten, "flatten"), ("view", "reshape", torch.reshape)
# F.dropout*: identity unless called with training=True (the default of all but the alpha ones)
DROPOUTS = {F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True, F.alpha_dropout: False,
            F.feature_alpha_dropout: False}
MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
AVG_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _function(tf, node: fx.Node, args: list, kwargs: dict):
    target = node.target
    if target in ARITHMETIC and not kwargs:  # torch.add's alpha, rounding modes: not translated
        ranks = {len(a.shape) for a in args[:2] if hasattr(a, "shape") and int(np.prod(a.shape)) > 1}
        if 4 in ranks and len(ranks) > 1:  # broadcast against W in PyTorch, against C here
            raise MixdeployError("the TFLite writer combines a feature map only with another, a scalar or a "
                                 "(N, C, 1, 1) tensor")
        return ARITHMETIC[target](args[0], args[1])
    if target in FLATTENS:
        return _flatten(tf, args[0], _arg(args, kwargs, 1, "start_dim", 0), _arg(args, kwargs, 2, "end_dim", -1))
    if target in RESHAPES:
        return _reshape(tf, args[0], args[1:] or [kwargs.get("shape")])
    if target in (torch.mean, "mean"):
        return _mean(tf, args[0], _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "keepdim", False))
    if target in (torch.cat, torch.concat, "cat"):
        parts, dim = list(_arg(args, kwargs, 0, "tensors")), _arg(args, kwargs, 1, "dim", 0)
        axis = _axes(dim, len(parts[0].shape))[0]
        return _concat(tf, parts) if axis == 3 else tf.concat(parts, axis)
    if target in (torch.split, "split", torch.chunk, "chunk"):
        x, dim = args[0], _arg(args, kwargs, 2, "dim", 0)
        chunks = target in (torch.chunk, "chunk")
        size = _arg(args, kwargs, 1, "chunks" if chunks else "split_size_or_sections", kwargs.get("split_size"))
        return _split(tf, x, _sizes(size, dim % len(x.shape), x, chunks), _axes(dim, len(x.shape))[0])
    if target is operator.getitem:
        return args[0][args[1]] if isinstance(args[0], (tuple, list)) else _index(tf, args[0], args[1])
    if _reads_shape(node):
        dim = _arg(args, kwargs, 1, "dim") if target == "size" else None
        return _nchw(args[0]) if dim is None else _nchw(args[0])[dim]
    if target in FUNCTIONS:
        mod = _as_module(FUNCTIONS[target], args[1:], kwargs)
        return _activation(mod)(tf, args[0], mod)
    if target in POOLS:
        kind = POOLS[target]
        names = MAX_POOL_ARGS if kind is nn.MaxPool2d else AVG_POOL_ARGS
        return _pool(tf, args[0], _as_module(kind, [], {**dict(zip(names, args[1:])), **kwargs}))
    if target in DROPOUTS:
        if _arg(args, kwargs, 2, "training", DROPOUTS[target]):
            raise MixdeployError(f"{target.__name__}(training=True) drops at random in eval mode too; pass "
                                 "training=self.training")
        return args[0]
    if target is F.adaptive_avg_pool2d and args[1] in GLOBAL_POOL:  # torch.fx passes output_size by position
        return tf.reduce_mean(args[0], [1, 2], keepdims=True)
    name = getattr(target, "__name__", target)
    raise MixdeployError(f"the TFLite writer cannot translate {name}(); export --format onnx, or open an issue with "
                         "the model")


def _keeps_order(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `node` maps each feature by itself (an activation, dropout), so a map flattened in NHWC
    order may pass through it to a Linear."""
    if node.op == "call_module":
        mod = modules[node.target]
        return isinstance(mod, (nn.Identity, nn.modules.dropout._DropoutNd)) or (
            isinstance(mod, tuple(ACTIVATIONS)) and not isinstance(mod, (nn.Softmax, nn.PReLU)))
    return node.target in DROPOUTS or FUNCTIONS.get(node.target) not in (None, nn.Softmax)


def _reads_shape(node: fx.Node) -> bool:
    """x.size(...) or x.shape: what PyTorch's shape is, whatever the layout."""
    return node.target == "size" or (node.target is getattr and node.args[1] == "shape")


def _flattens(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `node` flattens a tensor into (batch, features)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Flatten)
    return node.op in ("call_function", "call_method") and node.target in FLATTENS + RESHAPES


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

    try:
        graph = trace(module)
    except Untraceable as exc:
        raise MixdeployError(f"{exc}; the TFLite writer needs one it can follow: export --format onnx, or open an "
                             "issue with the model") from None
    modules = dict(module.named_modules())
    c, h, w = input_size
    shape = [1, h, w, c] if input_layout == "nhwc" else [1, c, h, w]

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)], autograph=False)
    def forward(x):  # Python walks the graph: nothing for autograph to convert (its errors would span lines)
        if input_layout == "nchw":
            with tf.name_scope("input/"):  # quantize's SQNR report names it so
                x = tf.transpose(x, [0, 2, 3, 1])
        env, flat = {}, {}  # flat: the (C, H, W) of maps larger than 1x1 flattened in NHWC order
        for node in graph.nodes:
            args = fx.node.map_arg(node.args, lambda n: env[n.name])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
            linear = node.op == "call_module" and isinstance(modules[node.target], nn.Linear)
            read = next((n for n in node.all_input_nodes if n.name in flat), None)
            if read is not None and not (linear or _keeps_order(node, modules) or _reads_shape(node)):
                raise MixdeployError(f"{read.name}: the TFLite writer flattens a feature map larger than 1x1 only "
                                     "into a Linear; export --format onnx, or open an issue with the model")
            if node.op == "placeholder":
                env[node.name] = x
            elif node.op == "get_attr":  # a module's own use of its weights, outside the layers translated
                raise MixdeployError(f"{node.target}: the TFLite writer cannot translate a parameter used in a "
                                     "forward() of your own; export --format onnx, or open an issue with the model")
            elif node.op == "call_module":
                mod = modules[node.target]
                with tf.name_scope(_scope(node.target)), _at(node.target):  # tensors named after the module
                    env[node.name] = (_linear(tf, args[0], _hwc_weight(mod.weight, flat[read.name]), mod.bias)
                                      if read is not None and linear else _module(tf, args[0], mod))
            elif node.op in ("call_function", "call_method"):
                stack = list((node.meta.get("nn_module_stack") or {}).values())
                where = stack[-1][0] if stack else node.name
                with tf.name_scope(_scope(where)), _at(where):
                    env[node.name] = _function(tf, node, list(args), dict(kwargs))
            elif node.op == "output":
                return {OUTPUT_NAME: tf.identity(args[0], name=OUTPUT_NAME)}
            if read is not None and _keeps_order(node, modules):  # still in NHWC order
                flat[node.name] = flat[read.name]
            if _flattens(node, modules) and len(args[0].shape) == 4 and _nchw(args[0])[2:] != (1, 1):
                flat[node.name] = _nchw(args[0])[1:]
        raise MixdeployError("the traced model has no output")

    return forward


def converter(module: nn.Module, input_size: tuple[int, int, int], fp16: bool = False, input_layout: str = "nhwc",
              representative: Callable | None = None, io_type: str = "float32") -> tf.lite.TFLiteConverter:
    """A TFLite converter for `module`: fp32, fp16 weights, or (with a representative dataset) full int8."""
    tf = tensorflow()
    forward = to_tf_function(module, input_size, input_layout)
    for_int8 = _FOR_INT8.set(representative is not None)
    try:  # traced here, with the activations of its precision
        traced = forward.get_concrete_function()
    finally:
        _FOR_INT8.reset(for_int8)
    conv = tf.lite.TFLiteConverter.from_concrete_functions([traced], forward)
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
    conv = converter(module, input_size, fp16, input_layout, representative, io_type)
    with converting():
        Path(path).write_bytes(conv.convert())
