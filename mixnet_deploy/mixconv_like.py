"""A MixConv written by the user: a module whose parts are two or more convs (its own, or in a
ModuleList, ModuleDict or Sequential of convs) that computes cat([conv_i(x_i)]) for x split along
channels into the convs' inputs, in the order the convs are registered. Recognised by what it
computes (float64, seeded random weights and input), not by how its forward() is written:
torch.split, chunk, slices or a loop all qualify."""
from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

_verdicts: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def _depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels


def _candidate(module: nn.Module) -> list[nn.Conv2d] | None:
    """The convs of a module made of MixConv groups alone: all depthwise, or all 1x1 (MixNet's grouped
    pointwise convs), with one stride, and no weights of its own. A module wrapping another (a
    MixConv inside) is not one: its convs are not its parts."""
    if isinstance(module, nn.Conv2d) or type(module) in CONTAINERS:
        return None
    convs = []
    for child in module.children():
        parts = list(child.children()) if type(child) in CONTAINERS else [child]
        if not all(isinstance(p, nn.Conv2d) and not list(p.children()) for p in parts):
            return None
        convs += parts
    if (len(convs) < 2 or len({c.stride for c in convs}) != 1
            or not (all(map(_depthwise, convs)) or all(c.kernel_size == (1, 1) and c.groups == 1 for c in convs))):
        return None
    own = sum(t.numel() for t in [*module.parameters(), *module.buffers()])
    theirs = sum(t.numel() for c in convs for t in [*c.parameters(), *c.buffers()])
    return convs if own == theirs else None


def _computes_mixconv(module: nn.Module, convs: list[nn.Conv2d]) -> bool:
    """Whether `module` gives what its convs give on consecutive channel ranges of the input."""
    reach = max(c.dilation[0] * (c.kernel_size[0] - 1) + 1 for c in convs)
    side = reach + 2 * convs[0].stride[0] + 3
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, sum(c.in_channels for c in convs), side, side, dtype=torch.float64, generator=generator)
    try:
        twin = copy.deepcopy(module).double().eval()
        twin_convs = [m for m in twin.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            for t in (p for c in twin_convs for p in c.parameters()):  # weights of its own: zeros prove nothing
                t.copy_(torch.randn(t.shape, dtype=t.dtype, generator=generator))
            got = twin(x)
            want = torch.cat([c(p) for c, p in zip(twin_convs, torch.split(x, [c.in_channels for c in convs], 1))], 1)
    except Exception:  # noqa: BLE001 - a module that cannot be copied or take this input computes something else
        return False
    return (isinstance(got, torch.Tensor) and got.shape == want.shape
            and bool((got - want).abs().max() <= 1e-12 * want.abs().max()))


def own_mixconv_groups(module: nn.Module) -> list[nn.Conv2d] | None:
    """The per-group convs of a user's own MixConv module, else None."""
    convs = _candidate(module)
    if convs is None:
        return None
    if module not in _verdicts:
        _verdicts[module] = _computes_mixconv(module, convs)
    return convs if _verdicts[module] else None
