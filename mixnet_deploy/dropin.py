"""MixConv as a drop-in for depthwise convolutions (Tan & Le 2019, section 3.3)."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .mixconv import MixConv


def is_depthwise(module: nn.Module) -> bool:
    """A plain depthwise Conv2d: one filter per channel, no channel multiplier."""
    return (
        type(module) is nn.Conv2d
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def replace_depthwise(
    model: nn.Module,
    kernel_sizes: Sequence[int] = (3, 5, 7, 9),
    partition: str = "equal",
    dilated: bool = False,
) -> int:
    """Replace every depthwise Conv2d of `model` in place by a MixConv; return how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not is_depthwise(child):
                continue
            mix = MixConv(
                child.in_channels,
                kernel_sizes,
                stride=child.stride[0],
                partition=partition,
                dilated=dilated and child.stride[0] == 1,
                bias=child.bias is not None,
            )
            setattr(parent, name, mix)
            replaced += 1
    return replaced
