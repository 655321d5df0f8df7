"""Cost models for choosing a lowering plan, from single-layer timings measured on the target
runtime (benchmarks/measure_costs.py): the measured times themselves for layer shapes that were
probed, and for other shapes a model linear in features of the lowered layer fitted to them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch import nn

from .deploy_modules import BlockConv, DeployConv, ExpandedMixConv, LoweredMixConv
from .errors import MixdeployError
from .lower import LayerInfo, Site, build_layer
from .plan import FAST_TAPS

TABLES = Path(__file__).parent / "cost_tables"
# ms per 1x1 multiply-add at least (1000 GMAC/s, beyond any CPU): a fit that put 1x1 work on other
# features (weight 0) would price a dense 1x1 conv, with several times a grouped one's work, as free
MAC_FLOOR = 1e-9
FEATURES = ("dw_px", "dw_taps", "dw_px_unaligned", "dw_taps_unaligned", "dw_taps_large", "pw_macs", "pw_macs_unaligned",
            "split_elems", "segments", "block_adds", "pad_elems")


def _conv_features(conv: DeployConv, in_hw: tuple[int, int], align: int, f: dict[str, float]) -> tuple[int, int]:
    top, bottom, left, right = conv.pads
    h = (in_hw[0] + top + bottom - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
    w = (in_hw[1] + left + right - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1
    c_in, c_out, groups = conv.in_channels, conv.out_channels, conv.groups
    if conv.asymmetric:
        f["pad_elems"] += c_in * (in_hw[0] + top + bottom) * (in_hw[1] + left + right)
    if groups > 1 and groups == c_in == c_out:
        tag = "" if c_in % align == 0 else "_unaligned"
        f["dw_px" + tag] += c_out * h * w
        f["dw_taps" + tag] += c_out * h * w * conv.kernel_size[0] ** 2
        if conv.kernel_size[0] * conv.kernel_size[1] > FAST_TAPS:  # XNNPACK's slow generic path
            f["dw_taps_large"] += c_out * h * w * conv.kernel_size[0] ** 2
    else:
        aligned = (c_in // groups) % align == 0 and (c_out // groups) % align == 0
        f["pw_macs" + ("" if aligned else "_unaligned")] += c_out * h * w * (c_in // groups) * conv.kernel_size[0] ** 2
    return h, w


def features(layer: nn.Module, in_hw: tuple[int, int], align: int) -> dict[str, float]:
    """What a lowered layer (DeployConv, BlockConv, LoweredMixConv, or ExpandedMixConv without its
    expansion rows, which its feeding conv costs anyway) costs, in the model's terms."""
    f = dict.fromkeys(FEATURES, 0.0)
    segments = layer.segments if isinstance(layer, (LoweredMixConv, ExpandedMixConv)) else [layer]
    out_elems = 0
    for seg in segments:
        if isinstance(seg, BlockConv):
            n, (h, w) = len(seg.pieces), seg.out_hw
            tag = "" if seg.channels % align == 0 else "_unaligned"
            f["dw_px" + tag] += n * seg.channels * h * w
            f["dw_taps" + tag] += sum(p.height * p.width for p in seg.pieces) * seg.channels * h * w
            f["block_adds"] += (n - 1) * seg.channels * h * w
            if None in seg.own_pads:  # a piece reads a window of the padded input
                f["pad_elems"] += seg.channels * (in_hw[0] + seg.pads[0] + seg.pads[1]) * (in_hw[1] + seg.pads[2] + seg.pads[3])
            out_elems += seg.channels * h * w
        else:
            h, w = _conv_features(seg, in_hw, align, f)
            out_elems += seg.out_channels * h * w
    if len(segments) > 1:  # an ExpandedMixConv's input is never split, only its outputs concatenated
        split = sum(layer.splits) * in_hw[0] * in_hw[1] if isinstance(layer, LoweredMixConv) else 0
        f["split_elems"] += split + out_elems
        f["segments"] += len(segments)
    return f


def shape_key(info: LayerInfo) -> str:
    """The identity of a layer shape in the measured table."""
    feed = f"|feed{list(info.feed)}" if info.feed else ""
    dilated = f"|dilation{info.dilations}" if max(info.dilations or [1]) > 1 else ""  # runs other kernels than dense ones
    return f"{info.kind}|{info.channels}|{info.out_channels}|{info.kernels}|{info.stride}|{list(info.in_hw)}{feed}{dilated}"


class CostModel:
    """Measured ms per candidate for probed shapes, else ms = weights . features (relative: a
    layer's costs compare with each other, not with other layers)."""

    def __init__(self, runtime: str, weights: dict[str, float], align: int,
                 table: dict[str, dict[str, float]] | None = None, source: dict | None = None) -> None:
        self.runtime, self.weights, self.align = runtime, weights, align
        self.table, self.source = table or {}, source or {}

    @staticmethod
    def exists(runtime: str) -> bool:
        return (TABLES / f"{runtime}.json").exists()

    @classmethod
    def load(cls, runtime: str) -> "CostModel":
        path = TABLES / f"{runtime}.json"
        if not path.exists():
            raise MixdeployError(f"no measured cost table for {runtime}; run benchmarks/measure_costs.py --runtime {runtime}")
        data = json.loads(path.read_text())
        return cls(runtime, data["weights"], data["align"], data.get("table"), data.get("source"))

    def cost(self, layer: nn.Module, in_hw: tuple[int, int]) -> float:
        f = features(layer, in_hw, self.align)
        return sum(max(self.weights.get(k, 0.0), MAC_FLOOR if k.startswith("pw_macs") else 0.0) * v for k, v in f.items())

    def choose(self, site: Site, info: LayerInfo) -> tuple[str, dict[str, float]]:
        """The cheapest candidate of a layer, and every candidate's cost. A probed shape chooses among
        the candidates that were measured (lowerings added later need a new measure_costs run)."""
        measured = self.table.get(shape_key(info), {})
        if measured and set(measured) <= set(info.candidates):
            costs = dict(measured)
        else:
            costs = {c: self.cost(build_layer(site, c), site.in_hw) for c in info.candidates}
        return min(costs, key=costs.get), costs


def fit(samples: list[tuple[str, dict[str, float], float]]) -> dict[str, float]:
    """Non-negative weights from (probe id, features, ms) samples; each probe's context cost
    cancels because features and times are centred per probe."""
    groups: dict[str, list[int]] = {}
    for i, (pid, _, _) in enumerate(samples):
        groups.setdefault(pid, []).append(i)
    x = np.array([[f[k] for k in FEATURES] for _, f, _ in samples], dtype=np.float64)
    y = np.array([t for _, _, t in samples], dtype=np.float64)
    for idx in groups.values():
        x[idx] -= x[idx].mean(0)
        y[idx] -= y[idx].mean()
    scale = np.maximum(np.abs(x).max(0), 1e-12)
    active = [j for j in range(len(FEATURES)) if np.abs(x[:, j]).max() > 0]
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active] / scale[active], y, rcond=None)
        if (coef >= 0).all() or not active:
            break
        active = [j for j, c in zip(active, coef) if c > 0]
    weights = dict.fromkeys(FEATURES, 0.0)
    for j, c in zip(active, coef):
        weights[FEATURES[j]] = float(c / scale[j])
    return weights

