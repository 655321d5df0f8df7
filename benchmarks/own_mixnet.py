"""mixnet_s as a user with a MixConv of their own would have it: timm's architecture (random-init
weights), every MixedConv2d replaced by the usual split / per-group convs / cat module. For comparing ours and
the peers' exports of an own network:

    python benchmarks/bench_peers.py --models benchmarks/own_mixnet.py:build --threads 1
"""
from __future__ import annotations

import timm
import torch
from timm.layers import MixedConv2d
from torch import nn


class MixConv(nn.Module):
    """Channels split into groups, a conv per group (depthwise of its own kernel size, or 1x1),
    concatenated."""

    def __init__(self, convs: list[nn.Conv2d], splits: list[int]) -> None:
        super().__init__()
        self.convs, self.splits = nn.ModuleList(convs), list(splits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(part) for conv, part in zip(self.convs, torch.split(x, self.splits, 1))], 1)


def build() -> nn.Module:
    """timm's mixnet_s (random-init) with its MixConvs rewritten as above."""
    model = timm.create_model("mixnet_s")
    for name, module in list(model.named_modules()):
        if isinstance(module, MixedConv2d):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, MixConv(list(module.values()), module.splits))
    return model
