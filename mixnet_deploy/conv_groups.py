"""Every conv-like layer as a list of independent conv groups with static padding.

A plain Conv2d is one group; a MixConv (ours, timm's MixedConv2d or the user's own) is one group per kernel
size. Padding is resolved to static (top, bottom, left, right) pads for the traced input size,
which turns timm's run-time TF-'same' padding (Conv2dSame) into plain numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from .complexity import depthwise_mixconv, mixconv_groups

Pads = tuple[int, int, int, int]  # top, bottom, left, right


@dataclass
class ConvGroup:
    """One convolution over a contiguous channel range; groups == in_ch for depthwise, else 1."""

    weight: torch.Tensor  # (out, in / groups, kh, kw)
    bias: torch.Tensor  # (out,)
    stride: int
    dilation: int
    pads: Pads
    depthwise: bool

    @property
    def in_channels(self) -> int:
        return self.weight.shape[0] if self.depthwise else self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel(self) -> int:
        return self.weight.shape[-1]

    def dense(self) -> "ConvGroup":
        """The same conv with dilation expanded into a zero-filled kernel (dilation 1)."""
        if self.dilation == 1:
            return self
        k = self.dilation * (self.kernel - 1) + 1
        weight = self.weight.new_zeros(*self.weight.shape[:2], k, k)
        weight[..., :: self.dilation, :: self.dilation] = self.weight
        return replace(self, weight=weight, dilation=1)


def same_pads(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF-'same' padding (before, after) of one spatial axis."""
    total = max((math.ceil(size / stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def static_pads(conv: nn.Conv2d, hw: tuple[int, int]) -> Pads:
    """Pads of `conv` at input size `hw`: its own symmetric padding, or timm's TF-'same' (Conv2dSame)."""
    from timm.layers import Conv2dSame
    from timm.layers.conv2d_same import Conv2dSameExport

    if isinstance(conv, (Conv2dSame, Conv2dSameExport)) or conv.padding == "same":  # PyTorch's 'same': stride 1,
        top, bottom = same_pads(hw[0], conv.kernel_size[0], conv.stride[0], conv.dilation[0])  # the extra pad after
        left, right = same_pads(hw[1], conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        return top, bottom, left, right
    if conv.padding == "valid":
        return 0, 0, 0, 0
    ph, pw = conv.padding
    return ph, ph, pw, pw


def _computes_with_its_weight(conv: nn.Conv2d) -> bool:
    """Whether `conv` convolves with its own weight and padding: nn.Conv2d's forward or timm's TF-'same'
    one, not a subclass that changes them at run time (timm's StdConv2d standardises its weight)."""
    from timm.layers import Conv2dSame
    from timm.layers.conv2d_same import Conv2dSameExport

    return type(conv).forward in (nn.Conv2d.forward, Conv2dSame.forward, Conv2dSameExport.forward)


def to_groups(module: nn.Module, hw: tuple[int, int]) -> list[ConvGroup] | None:
    """The conv groups of a Conv2d or MixConv at input size `hw`, or None for other modules (and for
    convs whose forward is their own: they are left as written, see _computes_with_its_weight)."""
    convs = mixconv_groups(module)
    if convs is None and isinstance(module, nn.Conv2d):
        convs = [module]
    if convs is None or not all(map(_computes_with_its_weight, convs)):
        return None
    groups, depthwise_layer = [], depthwise_mixconv(convs)  # a one-channel group counts by its siblings
    for conv in convs:
        square = conv.kernel_size[0] == conv.kernel_size[1] and conv.stride[0] == conv.stride[1]
        depthwise = depthwise_layer and conv.groups == conv.in_channels == conv.out_channels
        if (not square or conv.dilation[0] != conv.dilation[1] or (conv.groups != 1 and not depthwise)
                or conv.padding_mode != "zeros"):  # left as it is: ONNX exports it, TFLite's writer names it
            return None
        weight = conv.weight.detach().double()  # rewrites are computed in float64, rounded once at the end
        bias = conv.bias.detach().double() if conv.bias is not None else weight.new_zeros(weight.shape[0])
        groups.append(ConvGroup(weight, bias, conv.stride[0], conv.dilation[0], static_pads(conv, hw), depthwise))
    return groups


def batchnorm_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel, float64, of an eval-mode BatchNorm with running statistics."""
    ones = torch.ones_like(bn.running_var, dtype=torch.float64)
    weight = bn.weight.detach().double() if bn.weight is not None else ones  # affine=False: 1 and 0
    scale = weight / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = (bn.bias.detach().double() if bn.bias is not None else 0 * ones) - bn.running_mean.double() * scale
    return scale, shift


def fold_batchnorm(groups: list[ConvGroup], bn: nn.BatchNorm2d) -> list[ConvGroup]:
    """Fold an eval-mode BatchNorm that follows the concatenated groups into each group's conv."""
    scale, shift = batchnorm_affine(bn)
    folded, start = [], 0
    for g in groups:
        s = scale[start:start + g.out_channels]
        b = shift[start:start + g.out_channels]
        folded.append(replace(g, weight=g.weight * s.view(-1, 1, 1, 1), bias=g.bias * s + b))
        start += g.out_channels
    return folded


def _out(size: int, before: int, after: int, k: int, stride: int) -> int:
    return (size + before + after - k) // stride + 1


def crop(group: ConvGroup, in_hw: tuple[int, int]) -> ConvGroup:
    """Drop the outer kernel rows and columns that only ever meet padding at this input size
    (a 9x9 kernel on a 2x2 map keeps its 3x3 centre): exact, and less work on small maps."""
    g = group.dense()
    k, s = g.kernel, g.stride
    top, bottom, left, right = g.pads
    h, w = in_hw
    out_h, out_w = _out(h, top, bottom, k, s), _out(w, left, right, k, s)
    # kernel row r meets data for some output o when 0 <= o*s - top + r < h
    first = min(max(0, top - (out_h - 1) * s), max(0, left - (out_w - 1) * s))
    last = max(min(k - 1, h - 1 + top), min(k - 1, w - 1 + left))
    if first == 0 and last == k - 1:
        return group
    weight = g.weight[..., first:last + 1, first:last + 1]
    cut = k - 1 - last
    return replace(g, weight=weight, pads=(top - first, bottom - cut, left - first, right - cut))


def merge(groups: list[ConvGroup], in_hw: tuple[int, int]) -> ConvGroup:
    """Depthwise groups (same stride) as one conv: each kernel placed so that it reads exactly the
    input it read before, the rest zero."""
    dense = [g.dense() for g in groups]
    if len({g.stride for g in dense}) != 1:
        raise ValueError("groups with different strides cannot share one kernel")
    s = dense[0].stride
    top, left = max(g.pads[0] for g in dense), max(g.pads[2] for g in dense)
    k = max(max(top - g.pads[0], left - g.pads[2]) + g.kernel for g in dense)
    weights = []
    for g in dense:
        oy, ox = top - g.pads[0], left - g.pads[2]
        weights.append(torch.nn.functional.pad(g.weight, (ox, k - ox - g.kernel, oy, k - oy - g.kernel)))
    h, w = in_hw
    first = dense[0]
    out_h = _out(h, first.pads[0], first.pads[1], first.kernel, s)
    out_w = _out(w, first.pads[2], first.pads[3], first.kernel, s)
    pads = (top, max(0, (out_h - 1) * s + k - h - top), left, max(0, (out_w - 1) * s + k - w - left))
    return replace(first, weight=torch.cat(weights), bias=torch.cat([g.bias for g in dense]), pads=pads,
                   depthwise=True)  # even when the first group has one channel (a conv of groups=1)
