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
    """A large depthwise kernel cut into pieces (rectangles: top, left, height, width): pad once,
    slice, one small VALID depthwise conv per piece, add. Exact up to float rounding; runtimes with
    fast small kernels gain."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, pads: Pads,
                 pieces: list[tuple[int, int, int, int]], in_hw: tuple[int, int]):
        super().__init__()
        channels, _, k, _ = weight.shape
        rows, cols = max(i + h for i, _, h, _ in pieces), max(j + w for _, j, _, w in pieces)
        full = weight.new_zeros(channels, 1, rows, cols)
        full[..., :k, :k] = weight
        self.pads = (pads[0], pads[1] + rows - k, pads[2], pads[3] + cols - k)
        self.stride, self.channels = stride, channels
        h = in_hw[0] + pads[0] + pads[1]
        w = in_hw[1] + pads[2] + pads[3]
        self.out_hw = ((h - k) // stride + 1, (w - k) // stride + 1)
        kept = [(p, full[..., p[0]:p[0] + p[2], p[1]:p[1] + p[3]]) for p in pieces]
        kept = [(p, piece) for p, piece in kept if piece.any()]
        self.pieces = [p for p, _ in kept]
        # per piece, the window of the padded input it reads (top, left, height, width)
        self.spans = [(i, j, (self.out_hw[0] - 1) * stride + h, (self.out_hw[1] - 1) * stride + w)
                      for i, j, h, w in self.pieces]
        self.weights = nn.ParameterList([nn.Parameter(piece.float()) for _, piece in kept])
        self.bias = nn.Parameter(bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.pads
        x = F.pad(x, (left, right, top, bottom))
        out = None
        for n, (i, j, h, w) in enumerate(self.spans):
            y = F.conv2d(x[:, :, i:i + h, j:j + w], self.weights[n], self.bias if n == 0 else None, self.stride, 0, 1,
                         self.channels)
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
