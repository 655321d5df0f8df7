"""Lowering: a torch -> torch rewrite of a loaded model into its deploy graph, always verified.

BatchNorm is folded into the convolution before it (into every group of a MixConv), padding
becomes static, and every MixConv is rebuilt from its plan choice out of deploy_modules.
"""
from __future__ import annotations

import copy
import itertools
import weakref
from collections import Counter
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .complexity import in_eval_mode, mixconv_groups
from .conv_groups import ConvGroup, crop, fold_batchnorm, merge, to_groups
from .deploy_modules import BlockConv, DeployConv, ExpandedMixConv, LoweredMixConv, Untraceable, trace
from .errors import MixdeployError
from .parity import ParityReport, compare, reference_outputs
from .plan import PIECES, POINTWISE_CHOICES, DepthwiseChoice, Plan, depthwise_candidates, pieces
from .preprocess import random_images

TOLERANCE = 1e-5  # max abs error relative to max |reference|


class LoweringError(MixdeployError):
    """The lowered module does not compute what the original computes."""

    exit_code = 1


@dataclass
class LayerInfo:
    """A layer that takes a plan choice, with the shapes the cost model needs."""

    name: str
    kind: str  # "depthwise" or "pointwise"
    channels: list[int]
    out_channels: list[int]
    kernels: list[int]  # effective (dilation expanded)
    stride: int
    in_hw: tuple[int, int]
    candidates: list[str]
    feed: tuple[int, int] | None = None  # (in channels, groups) of the 1x1 conv that feeds a depthwise MixConv
    dilations: list[int] | None = None  # per group (None: 1 each); kernels holds their dilation-expanded sizes


@dataclass
class Lowered:
    """The deploy module, the plan it was built from, and its verification."""

    module: nn.Module
    plan: Plan
    parity: ParityReport


@dataclass
class Site:
    name: str
    groups: list[ConvGroup]
    in_hw: tuple[int, int]
    bn: str | None = None
    feed: tuple[int, int] | None = None  # see LayerInfo.feed


def _feed(previous: Site | None, groups: list[ConvGroup]) -> tuple[int, int] | None:
    """(in channels, groups) of `previous` when it is the 1x1 conv that expands into these depthwise groups."""
    if previous is None or not groups[0].depthwise:
        return None
    pw = previous.groups
    if any(g.depthwise or g.kernel != 1 or g.stride != 1 for g in pw) or sum(g.out_channels for g in pw) != sum(g.in_channels for g in groups):
        return None
    return sum(g.in_channels for g in pw), len(pw)


def _made_by(produced_by: dict[int, tuple[weakref.ref, Site]], tensor: torch.Tensor) -> Site | None:
    """The site whose output `tensor` is (None for another tensor, one that took a freed output's id too)."""
    ref, site = produced_by.get(id(tensor), (None, None))
    return site if ref is not None and ref() is tensor else None


class _Reads(TorchFunctionMode):
    """How many ops read or change each of the `watched` tensors (ops computing tensors, or assigning
    to one: not .shape or .dim()), by the name of the site that made it."""

    def __init__(self, watched: dict[int, tuple[weakref.ref, Site]]) -> None:
        super().__init__()
        self.watched, self.count = watched, Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # in-place ops return the tensor they change (relu_, +=), all but an assignment
        if func is torch.Tensor.__setitem__ or any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(out)):
            for leaf in tree_leaves((args, kwargs)):
                site = _made_by(self.watched, leaf) if isinstance(leaf, torch.Tensor) else None
                if site is not None:
                    self.count[site.name] += 1
        return out


def discover(model: nn.Module, input_size: tuple[int, int, int]) -> list[Site]:
    """Run the model once: every conv-like layer, its input size, and the BatchNorm fed by it."""
    inner = {id(c) for m in model.modules() for c in (mixconv_groups(m) or [])}
    sites: dict[int, Site] = {}
    # a weak reference to the tensor too: a freed one's id is reused, and holding them all kept every
    # conv's output of the run in memory (mixnet_xl at 1024 peaked at 2.3 GB instead of 1.5)
    produced_by: dict[int, tuple[weakref.ref, Site]] = {}
    handles = []

    def conv_hook(name):
        def hook(mod, inp, out):
            groups = to_groups(mod, tuple(inp[0].shape[-2:]))
            if groups is not None:
                previous = next(reversed(sites.values()), None)
                site = Site(name, groups, tuple(inp[0].shape[-2:]), feed=_feed(previous, groups))
                sites[id(mod)] = site
                produced_by[id(out)] = weakref.ref(out), site
        return hook

    def bn_hook(name):
        def hook(mod, inp, out):
            site = _made_by(produced_by, inp[0])
            # a BatchNorm without running statistics normalises by the batch's own: it cannot be folded
            if site is not None and site.bn is None and mod.running_mean is not None:
                site.bn = name
        return hook

    for name, mod in model.named_modules():
        if id(mod) in inner:
            continue
        if mixconv_groups(mod) is not None or isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook(name)))
        elif isinstance(mod, nn.BatchNorm2d):
            handles.append(mod.register_forward_hook(bn_hook(name)))
    reads = _Reads(produced_by)
    try:
        with torch.no_grad(), in_eval_mode(model), reads:
            model(torch.randn(1, *input_size))
    finally:
        for h in handles:
            h.remove()
    for site in sites.values():
        if reads.count[site.name] > 1:  # the output has other readers than its BatchNorm (bn(y) + y): they need it unfolded
            site.bn = None
    return list(sites.values())


def _kind(groups: list[ConvGroup]) -> str | None:
    if groups[0].depthwise and (len(groups) > 1 or groups[0].dense().kernel > 3):
        return "depthwise"
    if len(groups) > 1 and all(g.kernel == 1 and not g.depthwise for g in groups):
        return "pointwise"
    return None


def layer_info(site: Site) -> LayerInfo | None:
    """What the planner needs to know of a site (None: a site with nothing to choose)."""
    kind = _kind(site.groups)
    if kind is None:
        return None
    kernels = [g.dense().kernel for g in site.groups]
    even = len({(g.in_channels, g.out_channels) for g in site.groups}) == 1  # only even groups make one grouped conv
    candidates = (depthwise_candidates(kernels, [g.in_channels for g in site.groups]) if kind == "depthwise"
                  else [c for c in POINTWISE_CHOICES if even or c != "grouped"])
    return LayerInfo(site.name, kind, [g.in_channels for g in site.groups], [g.out_channels for g in site.groups], kernels, site.groups[0].stride,
                     site.in_hw, candidates, site.feed, [g.dilation for g in site.groups])


def _conv(g: ConvGroup) -> DeployConv:
    return DeployConv(g.weight, g.bias, g.stride, g.dilation, g.pads, g.in_channels if g.depthwise else 1)


def _depthwise(site: Site, choice: DepthwiseChoice) -> nn.Module:
    groups = site.groups
    starts = [0, *itertools.accumulate(g.in_channels for g in groups)]
    segments, start = [], 0
    ends = choice.ends([g.dense().kernel for g in groups], [g.in_channels for g in groups])
    for end in ends:  # a segment takes the channels [start, end) of every group that has some
        run = [crop(replace(g, weight=g.weight[max(start, at) - at:end - at], bias=g.bias[max(start, at) - at:end - at]), site.in_hw)
               for g, at in zip(groups, starts) if at < end and at + g.in_channels > start]
        g = merge(run, site.in_hw) if len(run) > 1 else run[0]
        if choice.cut and g.dense().kernel > PIECES[choice.cut]:
            g = g.dense()
            segments.append(BlockConv(g.weight, g.bias, g.stride, g.pads, pieces(g.kernel, choice.cut), site.in_hw))
        else:
            segments.append(_conv(g))
        start = end
    return LoweredMixConv([b - a for a, b in zip([0, *ends], ends)], segments)


def _pointwise(groups: list[ConvGroup], choice: str) -> nn.Module:
    ins = [g.in_channels for g in groups]
    first = groups[0]
    if choice == "split":
        return LoweredMixConv(ins, [_conv(g) for g in groups])
    bias = torch.cat([g.bias for g in groups])
    if choice == "grouped":  # layer_info offers it for even groups only
        return DeployConv(torch.cat([g.weight for g in groups]), bias, first.stride, 1, first.pads, len(groups))
    return DeployConv(_block_diagonal([g.weight for g in groups]), bias, first.stride, 1, first.pads, 1)


def _block_diagonal(weights: list[torch.Tensor]) -> torch.Tensor:
    """One dense 1x1 weight equal to these groups' weights side by side (exact for uneven groups too)."""
    out = weights[0].new_zeros(sum(w.shape[0] for w in weights), sum(w.shape[1] for w in weights), 1, 1)
    r = c = 0
    for w in weights:
        out[r:r + w.shape[0], c:c + w.shape[1]] = w
        r, c = r + w.shape[0], c + w.shape[1]
    return out


def build_layer(site: Site, choice: str | None) -> nn.Module:
    """The deploy module of the MixConv at `site` lowered with `choice` (None for a depthwise one: split)."""
    kind = _kind(site.groups)
    if kind == "depthwise":
        return _depthwise(site, DepthwiseChoice.parse(choice or "split"))
    if kind == "pointwise":
        if choice not in POINTWISE_CHOICES:
            raise MixdeployError(f"bad pointwise choice {choice!r} for {site.name}; use {', '.join(POINTWISE_CHOICES)}")
        return _pointwise(site.groups, choice)
    if len(site.groups) > 1:
        return LoweredMixConv([g.in_channels for g in site.groups], [_conv(g) for g in site.groups])
    return _conv(site.groups[0])


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


ELEMENTWISE = (nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Hardswish)


def _expand_rows(pw: DeployConv, splits: list[int]) -> list[tuple[tuple[int, int], DeployConv]]:
    """Per split, the input channel range and the 1x1 conv of `pw`'s rows that feed it (a split that
    spans several of pw's groups reads all their inputs, its weight zero across groups: exact)."""
    out_per, in_per = pw.out_channels // pw.groups, pw.in_channels // pw.groups
    dense = _block_diagonal(list(pw.weight.detach().chunk(pw.groups)))
    rows, start = [], 0
    for n in splits:
        first, last = start // out_per, (start + n - 1) // out_per
        weight = dense[start:start + n, first * in_per:(last + 1) * in_per]
        conv = DeployConv(weight, pw.bias[start:start + n].detach(), 1, 1, (0, 0, 0, 0), 1)
        rows.append(((first * in_per, (last + 1) * in_per), conv))
        start += n
    return rows


class _Traced:
    """A lowered module's graph, with how often each module is called."""

    def __init__(self, module: nn.Module) -> None:
        self.graph = trace(module)
        self.modules = dict(module.named_modules())
        self.calls = Counter(n.target for n in self.graph.nodes if n.op == "call_module")

    def calls_once(self, node: object, kinds: type | tuple[type, ...]) -> bool:
        """`node` calls a module of `kinds`, with one positional input, and no other node calls it."""
        return (isinstance(node, torch.fx.Node) and node.op == "call_module" and self.calls[node.target] == 1
                and isinstance(self.modules[node.target], kinds) and len(node.args) == 1 and not node.kwargs)

    def called(self, node: object, kinds: type | tuple[type, ...]) -> bool:
        """calls_once, and only one node reads its output."""
        return self.calls_once(node, kinds) and len(node.users) == 1


def _traced(module: nn.Module) -> _Traced | None:
    """None for a model torch.fx cannot trace (such as one whose control flow depends on its
    input): the rewrites that use it are optimisations, never needed."""
    try:
        return _Traced(module)
    except Untraceable:
        return None


def split_expansions(module: nn.Module) -> int:
    """Give each segment of a LoweredMixConv that is fed by a 1x1 conv (through elementwise
    activations, nothing else reading any of them) its own rows of that conv (ExpandedMixConv), so the
    runtime never copies the expanded tensor into parts. Rewrites `module` in place; returns how
    many MixConvs it rewrote."""
    traced = _traced(module)
    if traced is None:
        return 0
    modules, called = traced.modules, traced.called
    rewritten = 0
    for node in traced.graph.nodes:
        if not traced.calls_once(node, LoweredMixConv):
            continue
        mix, pw, acts = modules[node.target], node.args[0], []
        while called(pw, ELEMENTWISE):
            acts.insert(0, pw)
            pw = pw.args[0]
        if len(mix.segments) < 2 or not called(pw, DeployConv):
            continue
        conv = modules[pw.target]
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.pads != (0, 0, 0, 0):
            continue
        inputs, expands = zip(*_expand_rows(conv, mix.splits))
        chain = [modules[a.target] for a in acts if not isinstance(modules[a.target], nn.Identity)]
        act = chain[0] if len(chain) == 1 else nn.Sequential(*chain)
        _set(module, pw.target, ExpandedMixConv(list(inputs), list(expands), act, list(mix.segments), conv.in_channels))
        for done in acts + [node]:
            _set(module, done.target, nn.Identity())
        rewritten += 1
    return rewritten


def relu_into_segments(module: nn.Module) -> None:
    """Move a ReLU or ReLU6 that follows a MixConv kept in segments (through identities, nothing else
    reading them) into each segment, relu(concat(a, b)) = concat(relu(a), relu(b)), where runtimes
    fuse it into the segment's last conv: no activation after the concatenation is left (an int8
    RELU after a CONCATENATION is one XNNPACK leaves out). In place."""
    traced = _traced(module)
    if traced is None:
        return
    for node in traced.graph.nodes:
        if not traced.calls_once(node, (nn.ReLU, nn.ReLU6)):
            continue
        src = node.args[0]
        while traced.called(src, (nn.Identity, nn.Dropout)):
            src = src.args[0]
        mix = traced.modules[src.target] if traced.called(src, (LoweredMixConv, ExpandedMixConv)) else None
        if mix is None or len(mix.segments) < 2:
            continue
        mix.out_act = traced.modules[node.target]
        _set(module, node.target, nn.Identity())


def analyse(model: nn.Module, input_size: tuple[int, int, int]) -> list[LayerInfo]:
    """The layers of `model` that take a plan choice."""
    return [info for site in discover(model, input_size) if (info := layer_info(site)) is not None]


def signatures(layers: list[LayerInfo]) -> dict[str, str]:
    """Layer name -> what the layer is at any input size: kind, channels, kernels, stride."""
    return {layer.name: f"{layer.kind} {layer.channels}->{layer.out_channels} kernels {layer.kernels} "
                        f"stride {layer.stride}" for layer in layers}


def check_plan(plan: Plan, layers: list[LayerInfo]) -> None:
    """Raise MixdeployError when `plan` names a layer not in `layers`, was made for a model whose layer
    of that name is another (its shapes), or names a choice that layer cannot take."""
    mine = signatures(layers)
    other = next((name for name, shape in plan.shapes.items() if name in mine and shape != mine[name]), None)
    if other:
        raise MixdeployError(f"the plan was made for another model: its {other} is {plan.shapes[other]}, this "
                             f"model's is {mine[other]}; make one for this model (the `plan` of `mixdeploy info MODEL "
                             "--plan auto --json` is one to start from)")
    unknown = sorted(set(plan.layers) - {layer.name for layer in layers})
    if unknown:
        raise MixdeployError(f"the plan names layers that are not MixConv layers of this model: {', '.join(unknown[:3])} "
                             "(`mixdeploy info MODEL --plan auto` lists them)")
    for layer in layers:  # a null choice too: it would be lowered as the default, unsaid
        if layer.name in plan.layers and not fits(layer, plan.layers[layer.name]):
            choice = plan.layers[layer.name]
            raise MixdeployError(f"plan choice {choice!r} does not fit {layer.name}; "
                                 f"candidates: {', '.join(layer.candidates)}")


def fits(layer: LayerInfo, choice: object) -> bool:
    """A choice the layer can take: one of its candidates, or for a depthwise layer a candidate with
    any @A alignment (the candidates list @16 only, and only where it moves a boundary)."""
    if choice in layer.candidates:
        return True
    if layer.kind != "depthwise" or not isinstance(choice, str) or "@" not in choice:
        return False
    try:
        return str(replace(DepthwiseChoice.parse(choice), align=0)) in layer.candidates
    except MixdeployError:
        return False


def default_choice(layer: LayerInfo | None) -> str:
    """What a layer a plan does not name is lowered as: a depthwise MixConv split, a 1x1 grouped
    (dense when its groups are uneven)."""
    return "split" if layer is None or layer.kind == "depthwise" else layer.candidates[0]


def preset_plan(layers: list[LayerInfo], preset: str, target: str) -> Plan:
    """'split' keeps every MixConv split; 'fold' folds every depthwise MixConv and groups every 1x1."""
    if preset not in ("split", "fold"):
        raise MixdeployError(f"unknown plan preset {preset!r}")
    def pick(layer: LayerInfo) -> str:
        if preset == "split":
            return "split"
        if layer.kind == "pointwise":
            return layer.candidates[0]
        return "fold" if "fold" in layer.candidates else "split"

    return Plan({layer.name: pick(layer) for layer in layers}, target, preset, shapes=signatures(layers))


def lower(model: nn.Module, input_size: tuple[int, int, int], plan: Plan,
          check_inputs: torch.Tensor | None = None) -> Lowered:
    """Rewrite `model` (left untouched) by `plan` and verify the result on fresh random inputs
    plus `check_inputs` (e.g. real photos); raise LoweringError when it is out of tolerance. The
    returned plan records the layers' shapes."""
    model = model.eval()
    sites = discover(model, input_size)
    infos = {site.name: layer_info(site) for site in sites}
    layers = [info for info in infos.values() if info is not None]
    check_plan(plan, layers)
    if not plan.shapes:  # a plan from an older file, or written by hand: the returned one records them
        plan = replace(plan, shapes=signatures(layers))
    lowered = copy.deepcopy(model)
    for site in sites:
        if site.bn is not None:
            bn = model.get_submodule(site.bn)
            site.groups = fold_batchnorm(site.groups, bn)
            _set(lowered, site.bn, copy.deepcopy(getattr(bn, "act", nn.Identity())))
        _set(lowered, site.name, build_layer(site, plan.layers.get(site.name, default_choice(infos[site.name]))))
    split_expansions(lowered)
    relu_into_segments(lowered)
    report = verify(model, lowered, input_size, check_inputs)
    return Lowered(lowered.float(), plan, report)  # the rewrites' float64 weights, rounded once


def verify(reference: nn.Module, candidate: nn.Module, input_size: tuple[int, int, int],
           check_inputs: torch.Tensor | None = None) -> ParityReport:
    """Compare `candidate` with `reference`, both computed in float64, on fresh random images (and
    `check_inputs`): a test of the rewrite itself (lower() verifies the rewritten weights before
    rounding them to float32), free of float32 rounding (which grows with a model's depth and
    logit scale, and which the exported file's own parity check measures).
    Out of tolerance is an error."""
    x = random_images(4, input_size)
    if check_inputs is not None:
        x = torch.cat([x, check_inputs])
    report = compare(reference_outputs(reference, x), reference_outputs(candidate, x), max_rel=TOLERANCE)
    if not report.passed:
        raise LoweringError(f"lowered model differs from the original: {report.summary()}")
    return report
