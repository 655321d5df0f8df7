"""A MixConv written by the user: any module made only of convs that computes
cat([conv_i(x_i)]) for x split along channels into the convs' inputs, in the order the convs are
registered. Recognised by what it computes (float64, a seeded random input), not by how its
forward() is written: torch.split, chunk, slices or a loop all qualify."""
from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

_verdicts: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _candidate(module: nn.Module) -> list[nn.Conv2d] | None:
    """The convs of a module whose every part is a Conv2d (two or more), with no weights of its own."""
    if isinstance(module, (nn.Conv2d, nn.ModuleList, nn.ModuleDict, nn.Sequential)):
        return None
    leaves = [m for m in module.modules() if not list(m.children())]
    convs = [m for m in leaves if isinstance(m, nn.Conv2d)]
    if len(convs) < 2 or len(convs) != len(leaves):
        return None
    own = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
    theirs = sum(p.numel() for c in convs for p in c.parameters()) + sum(b.numel() for c in convs for b in c.buffers())
    return convs if own == theirs else None


def _computes_mixconv(module: nn.Module, convs: list[nn.Conv2d]) -> bool:
    """Whether `module` gives what its convs give on consecutive channel ranges of the input."""
    reach = max(c.dilation[0] * (c.kernel_size[0] - 1) + 1 for c in convs)
    side = reach + 2 * max(c.stride[0] for c in convs) + 3
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, sum(c.in_channels for c in convs), side, side, dtype=torch.float64, generator=generator)
    twin = copy.deepcopy(module).double().eval()
    twin_convs = [m for m in twin.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            got = twin(x)
            want = torch.cat([c(p) for c, p in zip(twin_convs, torch.split(x, [c.in_channels for c in convs], 1))], 1)
    except Exception:  # noqa: BLE001 - a forward() that cannot take this input computes something else
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
