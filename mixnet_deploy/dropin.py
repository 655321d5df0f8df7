"""MixConv as a drop-in for depthwise convolutions (Tan & Le 2019, section 3.3)."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .mixconv import MixConv

PREFIX = "mixconv_"  # a drop-in's name: this + a timm model's
KERNELS = (3, 5, 7, 9)  # of the MixConvs that replace its depthwise convs


def create_dropin(name: str, **kwargs: object) -> nn.Module:
    """timm's model named `name` without PREFIX (kwargs: create_model's), each depthwise conv replaced
    by a MixConv of KERNELS; ValueError when one cannot be or there is none."""
    import timm

    model = timm.create_model(name.removeprefix(PREFIX), **kwargs)
    if replace_depthwise(model, KERNELS) == 0:
        raise ValueError("the timm model has no depthwise convolution to replace with MixConv")
    return model


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise convolution: one filter per channel, no channel multiplier (a Conv2d, timm's
    TF-'same' Conv2dSame among them, or timm's CondConv2d, which a MixConv cannot replace)."""
    from timm.layers import CondConv2d

    return (
        isinstance(module, (nn.Conv2d, CondConv2d))
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def replace_depthwise(
    model: nn.Module,
    kernel_sizes: Sequence[int] = (3, 5, 7, 9),
    partition: str = "equal",
    dilated: bool = False,
) -> int:
    """Replace every depthwise Conv2d of `model` in place by a MixConv; return how many were replaced.
    All or none: a layer a MixConv cannot take (not 'same'-padded, so a MixConv would change its
    output size; too few channels for the groups) is a ValueError naming it, with the model untouched."""
    replacements = []
    for path, parent in model.named_modules():
        for name, child in parent.named_children():
            if is_depthwise(child):
                where = f"{path}.{name}" if path else name
                replacements.append((parent, name, _mixconv(child, where, kernel_sizes, partition, dilated)))
    for parent, name, mix in replacements:
        setattr(parent, name, mix)
    return len(replacements)


def _mixconv(conv: nn.Conv2d, where: str, kernel_sizes: Sequence[int], partition: str, dilated: bool) -> MixConv:
    """The MixConv that takes `conv`'s place, or a ValueError naming `where`."""
    from timm.layers import CondConv2d
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport

    if isinstance(conv, CondConv2d):
        raise ValueError(f"{where}: a CondConv2d mixes per-sample expert kernels; a MixConv cannot take its place")
    tf_same = isinstance(conv, (Conv2dSame, Conv2dSameExport))  # padded at run time: the output size of 'same'
    size_kept = ((tf_same or conv.padding in ("same", tuple(k // 2 for k in conv.kernel_size))) and conv.dilation == (1, 1)
                 and conv.stride[0] == conv.stride[1] and conv.padding_mode == "zeros"
                 and all(k % 2 for k in conv.kernel_size))
    if not size_kept:
        raise ValueError(f"{where}: depthwise conv with kernel {conv.kernel_size}, stride {conv.stride}, padding "
                         f"{conv.padding}, dilation {conv.dilation} is not an odd-kernel 'same'-padded conv; a MixConv "
                         "in its place would change its output size")
    try:
        return MixConv(conv.in_channels, kernel_sizes, stride=conv.stride[0], partition=partition,
                       dilated=dilated and conv.stride[0] == 1, bias=conv.bias is not None)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
