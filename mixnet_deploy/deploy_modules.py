"""The modules a lowered model is made of; every exporter translates exactly these."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .conv_groups import Pads
from .errors import MixdeployError
from .plan import Piece


class DeployConv(nn.Conv2d):
    """A Conv2d with static, possibly asymmetric pads (top, bottom, left, right) and a bias, in the
    dtype of `weight` (lower() builds in float64, verifies, then rounds to float32 once)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, dilation: int, pads: Pads, groups: int):
        out_ch, in_per_group, k, _ = weight.shape
        symmetric = pads[0] == pads[1] and pads[2] == pads[3]
        padding = (pads[0], pads[2]) if symmetric else (0, 0)
        super().__init__(in_per_group * groups, out_ch, k, stride, padding, dilation, groups, bias=True,
                         dtype=weight.dtype)
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
    """A large depthwise kernel cut into pieces (plan.Piece), one small depthwise conv per piece,
    outputs added. A piece that needs only padding of the input (it is centred like the kernel)
    reads the input itself; the others read windows of the input padded once. Exact up to float
    rounding; runtimes with fast small kernels gain."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, pads: Pads, pieces: list[Piece],
                 in_hw: tuple[int, int]):
        super().__init__()
        channels, _, k, _ = weight.shape
        rows = max(p.top + (p.height - 1) * p.step + 1 for p in pieces)
        cols = max(p.left + p.width for p in pieces)
        full = weight.new_zeros(channels, 1, rows, cols)
        full[..., :k, :k] = weight
        self.pads = (pads[0], pads[1] + rows - k, pads[2], pads[3] + cols - k)
        self.stride, self.channels = stride, channels
        h = in_hw[0] + pads[0] + pads[1]
        w = in_hw[1] + pads[2] + pads[3]
        self.out_hw = ((h - k) // stride + 1, (w - k) // stride + 1)
        kept = [(p, full[..., p.top:p.top + (p.height - 1) * p.step + 1:p.step, p.left:p.left + p.width]) for p in pieces]
        # pieces of zeros add nothing (a kernel zero-padded to the piece grid), but one stays: a segment
        # whose weights are all zero (a BatchNorm gamma of 0, pruned channels) still gives its bias
        kept = [(p, piece) for p, piece in kept if piece.any()] or kept[:1]
        self.pieces = [p for p, _ in kept]
        # per piece, the window of the padded input it reads (top, left, height, width) ...
        self.spans = [(p.top, p.left, (self.out_hw[0] - 1) * stride + (p.height - 1) * p.step + 1,
                       (self.out_hw[1] - 1) * stride + p.width) for p in self.pieces]
        # ... and that window as pads of the unpadded input (top, bottom, left, right); None: it needs a crop
        self.own_pads = []
        for i, j, sh, sw in self.spans:
            own = (pads[0] - i, i + sh - pads[0] - in_hw[0], pads[2] - j, j + sw - pads[2] - in_hw[1])
            self.own_pads.append(own if min(own) >= 0 else None)
        self.weights = nn.ParameterList([nn.Parameter(piece) for _, piece in kept])
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.pads
        padded, out = None, None
        for n, (piece, (i, j, h, w), own) in enumerate(zip(self.pieces, self.spans, self.own_pads)):
            bias = self.bias if n == 0 else None
            if own is None:
                padded = F.pad(x, (left, right, top, bottom)) if padded is None else padded
                src, padding = padded[:, :, i:i + h, j:j + w], (0, 0)
            elif own[0] == own[1] and own[2] == own[3]:
                src, padding = x, (own[0], own[2])
            else:
                src, padding = F.pad(x, (own[2], own[3], own[0], own[1])), (0, 0)
            y = F.conv2d(src, self.weights[n], bias, self.stride, padding, (piece.step, 1), self.channels)
            out = y if out is None else out + y
        return out


class LoweredMixConv(nn.Module):
    """Split the channels into segments, run each segment's conv and then `out_act` (a ReLU that
    followed the MixConv, moved in by lower.relu_into_segments), concatenate (one segment: no split)."""

    def __init__(self, splits: list[int], segments: list[nn.Module]):
        super().__init__()
        self.splits = list(splits)
        self.segments = nn.ModuleList(segments)
        self.out_act: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.segments) == 1:
            return self.out_act(self.segments[0](x))
        parts = torch.split(x, self.splits, dim=1)
        return torch.cat([self.out_act(seg(p)) for seg, p in zip(self.segments, parts)], dim=1)


class ExpandedMixConv(nn.Module):
    """A 1x1 conv, its elementwise activation and the LoweredMixConv it feeds as one module: each
    segment gets its own rows of the 1x1 conv (reading only the input channels those rows read), so
    the expanded tensor, the largest of an inverted residual block, is never split. Exact. `out_act`
    as in LoweredMixConv."""

    def __init__(self, inputs: list[tuple[int, int]], expands: list[DeployConv], act: nn.Module,
                 segments: list[nn.Module], in_channels: int):
        super().__init__()
        self.inputs = list(inputs)  # per segment, the input channel range its expand conv reads
        self.expands = nn.ModuleList(expands)
        self.act = act
        self.segments = nn.ModuleList(segments)
        self.in_channels = in_channels
        self.out_act: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = {(a, b): x if (a, b) == (0, self.in_channels) else x[:, a:b] for a, b in dict.fromkeys(self.inputs)}
        outs = [self.out_act(seg(self.act(expand(parts[r]))))
                for r, expand, seg in zip(self.inputs, self.expands, self.segments)]
        return torch.cat(outs, dim=1)


LEAVES = (DeployConv, BlockConv, LoweredMixConv, ExpandedMixConv)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        from timm.layers import BatchNormAct2d, Linear

        # a Linear that computes nn.Linear's (timm's, in MobileNetV3/V4 heads) is one piece; another is traced
        linear = isinstance(module, nn.Linear) and type(module).forward in (nn.Linear.forward, Linear.forward)
        # so is timm's BatchNorm + activation, where no conv precedes it (its forward reads x.ndim)
        leaf = LEAVES + (BatchNormAct2d,)
        return isinstance(module, leaf) or linear or super().is_leaf_module(module, name)


class Untraceable(MixdeployError):
    """torch.fx cannot follow a forward() (a loop over a tensor, control flow on its values)."""


def trace(module: nn.Module) -> fx.Graph:
    """The data flow of a lowered module, with every deploy module as one node."""
    tracer = _Tracer()
    try:
        return tracer.trace(module)
    except Exception as exc:  # noqa: BLE001 - whatever the user's forward() raises on torch.fx's proxies
        where, kind = next(reversed(tracer.module_stack.values()), ("", type(module)))
        reason = str(exc).split(". ")[0].splitlines()[0] if str(exc) else type(exc).__name__
        raise Untraceable(f"{where or 'the model'} ({kind.__name__}): torch.fx cannot follow its forward(): "
                          f"{reason}") from None


def modules_called(module: nn.Module) -> set[str]:
    """The paths of the modules that `trace` keeps whole (the writers translate each as one piece);
    none for a model torch.fx cannot follow (its ONNX SQNR report then names innermost modules)."""
    try:
        return {str(node.target) for node in trace(module).nodes if node.op == "call_module"}
    except Untraceable:
        return set()
