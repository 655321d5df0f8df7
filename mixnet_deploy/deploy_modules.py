"""The modules a lowered model is made of; every exporter translates exactly these."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv_groups import Pads


class DeployConv(nn.Conv2d):
    """A Conv2d with static, possibly asymmetric pads (top, bottom, left, right) and a bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, dilation: int, pads: Pads, groups: int):
        out_ch, in_per_group, k, _ = weight.shape
        symmetric = pads[0] == pads[1] and pads[2] == pads[3]
        padding = (pads[0], pads[2]) if symmetric else (0, 0)
        super().__init__(in_per_group * groups, out_ch, k, stride, padding, dilation, groups, bias=True)
        self.weight.data.copy_(weight)
        self.bias.data.copy_(bias)
        self.pads = tuple(pads)
        self.asymmetric = not symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            top, bottom, left, right = self.pads
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class BlockConv(nn.Module):
    """A large depthwise kernel cut into block x block pieces: pad once, slice, small VALID
    depthwise convs, add. Exact up to float rounding; runtimes with fast small kernels gain."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, pads: Pads, block: int, in_hw: tuple[int, int]):
        super().__init__()
        channels, _, k, _ = weight.shape
        n = -(-k // block)
        full = weight.new_zeros(channels, 1, n * block, n * block)
        full[..., :k, :k] = weight
        extra = n * block - k
        self.pads = (pads[0], pads[1] + extra, pads[2], pads[3] + extra)
        self.block, self.stride, self.channels = block, stride, channels
        h = in_hw[0] + pads[0] + pads[1]
        w = in_hw[1] + pads[2] + pads[3]
        self.out_hw = ((h - k) // stride + 1, (w - k) // stride + 1)
        offsets, pieces = [], []
        for i in range(n):
            for j in range(n):
                piece = full[..., i * block:(i + 1) * block, j * block:(j + 1) * block]
                if piece.any():
                    offsets.append((i * block, j * block))
                    pieces.append(piece)
        self.offsets = offsets
        self.weight = nn.Parameter(torch.stack(pieces).float())
        self.bias = nn.Parameter(bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.pads
        x = F.pad(x, (left, right, top, bottom))
        span_h = (self.out_hw[0] - 1) * self.stride + self.block
        span_w = (self.out_hw[1] - 1) * self.stride + self.block
        out = None
        for n, (i, j) in enumerate(self.offsets):
            part = x[:, :, i:i + span_h, j:j + span_w]
            y = F.conv2d(part, self.weight[n], self.bias if n == 0 else None, self.stride, 0, 1, self.channels)
            out = y if out is None else out + y
        return out


class LoweredMixConv(nn.Module):
    """Split the channels into segments, run each segment's conv, concatenate (one segment: no split)."""

    def __init__(self, splits: list[int], segments: list[nn.Module]):
        super().__init__()
        self.splits = list(splits)
        self.segments = nn.ModuleList(segments)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.segments) == 1:
            return self.segments[0](x)
        parts = torch.split(x, self.splits, dim=1)
        return torch.cat([seg(p) for seg, p in zip(self.segments, parts)], dim=1)
