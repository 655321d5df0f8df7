"""MixConv, mixed depthwise convolution (Tan & Le 2019, section 3)."""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import nn


def split_channels(channels: int, groups: int, partition: str = "equal") -> list[int]:
    """Channels per group.

    equal: as even as possible, the remainder to group 0 (timm and the TF reference do the same);
    exponential: group i gets 2^-(i+1) of the channels, the last group the rest
    (32 channels in 4 groups -> (8, 8, 8, 8) and (16, 8, 4, 4)).
    """
    if groups < 1 or channels < groups:
        raise ValueError(f"cannot split {channels} channels into {groups} groups")
    if partition == "equal":
        splits = [channels // groups] * groups
        splits[0] += channels - sum(splits)
    elif partition == "exponential":
        splits = [channels >> (i + 1) for i in range(groups - 1)]
        splits.append(channels - sum(splits))
        if min(splits) < 1:
            raise ValueError(f"exponential partition of {channels} channels into {groups} groups leaves an empty group")
    else:
        raise ValueError(f"unknown partition {partition!r}; use 'equal' or 'exponential'")
    return splits


def _whole(value: object) -> bool:
    """An int (numpy's too), not a bool or a float."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class MixConv(nn.Module):
    """Split channels into groups, convolve each depthwise with its own kernel size, concatenate.

    dilated=True replaces a k x k kernel (k > 3) with a 3 x 3 kernel of dilation (k - 1) / 2,
    the same receptive field at fewer weights (stride 1 only, as in the paper).
    """

    def __init__(
        self,
        channels: int,
        kernel_sizes: Sequence[int] = (3, 5, 7, 9),
        stride: int = 1,
        partition: str | Sequence[int] = "equal",
        dilated: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if not _whole(channels) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        try:
            kernels = [] if isinstance(kernel_sizes, (str, bytes)) else list(kernel_sizes)
        except TypeError:
            kernels = []
        if not kernels:
            raise ValueError(f"kernel_sizes must be a non-empty sequence of odd ints, like (3, 5, 7), got {kernel_sizes!r}")
        if not all(_whole(k) and k % 2 == 1 and k > 0 for k in kernels):
            raise ValueError(f"kernel sizes must be odd and positive, got {kernels}")
        if not _whole(stride) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        if dilated and stride != 1:
            raise ValueError("dilated MixConv is defined for stride 1 only")
        if isinstance(partition, str):
            splits = split_channels(channels, len(kernels), partition)
        else:
            splits = list(partition)
            if sum(splits) != channels or len(splits) != len(kernels) or min(splits) < 1:
                raise ValueError(f"partition {splits} does not split {channels} channels into {len(kernels)} groups")
        self.splits = splits
        self.kernel_sizes = kernels
        self.convs = nn.ModuleList()
        for k, c in zip(kernels, splits):
            kernel, dilation = (3, (k - 1) // 2) if dilated and k > 3 else (k, 1)
            pad = dilation * (kernel - 1) // 2
            self.convs.append(nn.Conv2d(c, c, kernel, stride, pad, dilation, groups=c, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, dim=1)
        return torch.cat([conv(p) for conv, p in zip(self.convs, parts)], dim=1)
