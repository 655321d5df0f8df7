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

FEED = (16, 1)  # (in channels, groups) of the 1x1 expansion conv of a depthwise probe whose layer has none
VERSION = 3  # of the probe models: timings of other versions are not comparable (3: the layer's own expansion)


def _expansion(info: LayerInfo) -> tuple[int, int]:
    return info.feed or FEED


def probe_input(info: LayerInfo) -> tuple[int, int, int]:
    """The input size of `info`'s probe model."""
    return (_expansion(info)[0] if info.kind == "depthwise" else sum(info.channels), *info.in_hw)


def _depthwise_layer(info: LayerInfo) -> MixConv:
    """A MixConv with the layer's own groups: kernel, dilation (timed as they run, not as the dense
    kernels LayerInfo.kernels counts) and even sizes too, padded 'same' at stride 1."""
    layer = MixConv(sum(info.channels), [3] * len(info.channels), info.stride, partition=info.channels)
    for i, (c, dense, d) in enumerate(zip(info.channels, info.kernels, info.dilations or [1] * len(info.kernels))):
        k = (dense - 1) // d + 1
        layer.convs[i] = nn.Conv2d(c, c, k, info.stride, "same" if info.stride == 1 else d * (k - 1) // 2, d,
                                   groups=c, bias=False)
    return layer


def probe(info: LayerInfo, choice: str) -> Lowered:
    """A probe model for `info`, lowered with `choice` (its layer: `probed_layer`). A depthwise MixConv
    is fed by its layer's 1x1 expansion conv, with as many groups (or a dense one), as in an inverted
    residual block (so a split one gets its own rows of it, see lower.split_expansions, and a
    segment spanning two of its groups reads both); a grouped 1x1 one by a depthwise 3x3 conv."""
    from timm.layers import MixedConv2d

    channels, out = sum(info.channels), sum(info.out_channels)
    if info.kind == "depthwise":
        feed_in, feed_groups = _expansion(info)
        feed = MixedConv2d(feed_in, channels, [1] * feed_groups)
        layer = _depthwise_layer(info)
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
