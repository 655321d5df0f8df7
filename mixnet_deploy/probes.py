"""Single-layer probe models: one MixConv at a real layer's shape, fed the way the whole network
feeds it and followed by a cheap depthwise 3x3 conv, so the runtime lays data out as it would
inside the network. Cost models and tuning time these."""
from __future__ import annotations

import torch
from torch import nn

from .deploy_modules import ExpandedMixConv
from .lower import LayerInfo, Lowered, lower
from .mixconv import MixConv
from .plan import Plan

FEED = 16  # input channels of a depthwise probe's 1x1 expansion conv
VERSION = 2  # of the probe models: timings of other versions are not comparable (2: the expansion feed)


def probe_input(info: LayerInfo) -> tuple[int, int, int]:
    """The input size of `info`'s probe model."""
    return (FEED if info.kind == "depthwise" else sum(info.channels), *info.in_hw)


def probe(info: LayerInfo, choice: str) -> Lowered:
    """A probe model for `info`, lowered with `choice` (its layer: `probed_layer`). A depthwise MixConv
    is fed by a 1x1 expansion conv, as in an inverted residual block (so a split one gets its own
    rows of it, see lower.split_expansions); a grouped 1x1 one by a depthwise 3x3 conv."""
    from timm.layers import MixedConv2d

    channels, out = sum(info.channels), sum(info.out_channels)
    if info.kind == "depthwise":
        feed = nn.Conv2d(FEED, channels, 1)
        layer = MixConv(channels, info.kernels, info.stride, partition=info.channels)
    else:
        feed = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        layer = MixedConv2d(channels, out, [1] * len(info.channels))
    model = nn.Sequential(feed, layer, nn.Conv2d(out, out, 3, padding=1, groups=out)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return lower(model, probe_input(info), Plan({"1": choice}))


def probed_layer(lowered: Lowered) -> nn.Module:
    """The lowered layer of a probe model (with its expansion rows when it took them)."""
    first = lowered.module[0]
    return first if isinstance(first, ExpandedMixConv) else lowered.module[1]
