"""Single-layer probe models: one MixConv at a real layer's shape between two cheap depthwise
3x3 convs, so the runtime lays data out as it would inside the whole network. Cost models and
tuning time these."""
from __future__ import annotations

import torch
from torch import nn

from .lower import LayerInfo, Lowered, lower
from .mixconv import MixConv
from .plan import Plan


def probe(info: LayerInfo, choice: str) -> Lowered:
    """A probe model for `info`, lowered with `choice` (its layer is module '1')."""
    from timm.layers import MixedConv2d

    channels, out = sum(info.channels), sum(info.out_channels)
    if info.kind == "depthwise":
        layer = MixConv(channels, info.kernels, info.stride, partition=info.channels)
    else:
        layer = MixedConv2d(channels, out, [1] * len(info.channels))
    model = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels), layer,
                          nn.Conv2d(out, out, 3, padding=1, groups=out)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return lower(model, (channels, *info.in_hw), Plan({"1": choice}))
