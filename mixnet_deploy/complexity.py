"""Parameters and multiply-adds counted from a model by running it once."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .mixconv import MixConv
from .mixconv_like import own_mixconv_groups

ELEMENTWISE = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.GELU)


@dataclass
class MixConvLayer:
    """One MixConv layer (timm MixedConv2d or ours) as the info table shows it."""

    name: str
    kind: str  # "depthwise" or "pointwise"
    channels: list[int]
    kernel_sizes: list[int]
    stride: int
    dilation: list[int]
    macs: int


@dataclass
class Complexity:
    """Counts for one input size. macs = conv and linear multiply-adds plus one per element of
    BatchNorm and activations (the convention that reproduces the MixNet paper's Table 2)."""

    params: int
    macs: int
    conv_macs: int
    input_size: tuple[int, int, int]
    mixconv_layers: list[MixConvLayer] = field(default_factory=list)


def mixconv_groups(module: nn.Module) -> list[nn.Conv2d] | None:
    """The per-group convs of a MixConv (ours, timm's MixedConv2d or the user's own), else None."""
    from timm.layers import MixedConv2d

    if isinstance(module, MixConv):
        return list(module.convs)
    if isinstance(module, MixedConv2d):
        return list(module.values())
    return own_mixconv_groups(module)


def depthwise_mixconv(groups: list[nn.Conv2d]) -> bool:
    """Whether a MixConv's groups are depthwise: one filter per channel (a one-channel group, whose
    groups=1 says nothing, counts by its siblings)."""
    return any(c.groups > 1 and c.groups == c.in_channels == c.out_channels for c in groups)


@contextlib.contextmanager
def in_eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode meanwhile (a look at it must not move a BatchNorm's running statistics),
    then each module back in its own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:  # one by one: train() would set every child's mode too
            m.training = training


def _conv_macs(conv: nn.Conv2d, out: torch.Tensor) -> int:
    kh, kw = conv.kernel_size
    return out.numel() * (conv.in_channels // conv.groups) * kh * kw


def count(model: nn.Module, input_size: tuple[int, int, int]) -> Complexity:
    """Count params, MACs and the MixConv layers of `model` at batch 1 and `input_size` (C, H, W)."""
    conv_macs = [0]
    other = [0]
    layers: list[MixConvLayer] = []
    owner = {}
    for name, mod in model.named_modules():
        groups = mixconv_groups(mod)
        if groups is not None:
            layer = MixConvLayer(
                name,
                "depthwise" if depthwise_mixconv(groups) else "pointwise",
                [c.in_channels for c in groups],
                [c.kernel_size[0] for c in groups],
                groups[0].stride[0],
                [c.dilation[0] for c in groups],
                0,
            )
            layers.append(layer)
            owner.update({id(c): layer for c in groups})

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            macs = _conv_macs(mod, out)
            conv_macs[0] += macs
            if id(mod) in owner:
                owner[id(mod)].macs += macs
        elif isinstance(mod, nn.Linear):
            conv_macs[0] += out.numel() // out.shape[-1] * mod.in_features * mod.out_features
        elif isinstance(mod, ELEMENTWISE):
            other[0] += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad(), in_eval_mode(model):
            model(torch.zeros(1, *input_size))
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return Complexity(params, conv_macs[0] + other[0], conv_macs[0], tuple(input_size), layers)
