"""Lowering plans: one choice per MixConv layer, saved as JSON.

Depthwise MixConv choices: "split" (Split, one depthwise conv per group, Concat), "fold" (one
conv of the largest kernel, smaller kernels zero-padded and centred), "fold<=K" (fold only the
adjacent groups with kernels up to K), each optionally cut into pieces whose outputs add up:
"+blockB" (every kernel larger than B into B x B squares), "+strips" (every kernel larger than
5x5 into full-width strips of at most 25 taps: a 7x7 is 3x7 + 3x7 + 1x7) or "+pairs"
(a centred full-width band plus mirrored row pairs: rows c-a and c+a of a kernel centred on row c
form one 2-row kernel dilated 2a; every piece is centred like the kernel, so each reads the
input itself, padded but never cropped). "@A" moves every boundary between
segments down to a multiple of A channels (the channels moved join the next segment and take its
kernel), so that a runtime with A-channel blocks (ONNX Runtime's NCHWc on AVX-512: 16) keeps the
segments in its blocked layout. Grouped 1x1 MixConv choices: "grouped" (one Conv
with groups=g), "dense" (one Conv with a block-diagonal weight), "split".
"""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .errors import MixdeployError, is_number

_DEPTHWISE = re.compile(r"^(split|fold|fold<=(\d+))(?:@(\d+))?(?:\+(block3|block5|strips|pairs))?$")
POINTWISE_CHOICES = ("grouped", "dense", "split")
ALIGN = 16  # the channel block that "@" candidates round segment boundaries to
FAST_TAPS = 25  # XNNPACK's largest fast depthwise micro-kernel (5x5); more taps take a slow generic path
# how a kernel is cut -> largest kernel left whole
PIECES = {"block3": 3, "block5": 5, "strips": math.isqrt(FAST_TAPS), "pairs": math.isqrt(FAST_TAPS)}
PAIRS_MAX = FAST_TAPS // 2  # a row pair of a larger kernel has more than FAST_TAPS taps


class Piece(NamedTuple):
    """Part of a kernel: `height` rows from `top` every `step` rows, `width` columns from `left`."""

    top: int
    left: int
    height: int
    width: int
    step: int = 1


def pieces(kernel: int, scheme: str) -> list[Piece]:
    """Pieces that cover a kernel x kernel depthwise kernel: block x block squares (the last row and
    column reach past the kernel, zero-padded), full-width strips of at most FAST_TAPS taps, or a
    centred band and mirrored row pairs of at most FAST_TAPS taps each."""
    if scheme == "strips":
        rows = max(1, FAST_TAPS // kernel)
        return [Piece(i, 0, min(rows, kernel - i), kernel) for i in range(0, kernel, rows)]
    if scheme == "pairs":
        c, half = kernel // 2, max(0, (FAST_TAPS // kernel - 1) // 2)
        return [Piece(c - half, 0, 2 * half + 1, kernel)] + [Piece(c - a, 0, 2, kernel, 2 * a) for a in range(half + 1, c + 1)]
    b = PIECES[scheme]
    return [Piece(i, j, b, b) for i in range(0, kernel, b) for j in range(0, kernel, b)]


@dataclass(frozen=True)
class DepthwiseChoice:
    """merge: kernels up to this size share one conv (0: none, a large number: all); cut: a PIECES
    scheme for kernels above its size, or None."""

    merge: int
    cut: str | None
    align: int = 0

    @classmethod
    def parse(cls, text: str) -> "DepthwiseChoice":
        m = _DEPTHWISE.match(text)
        if not m or (m.group(3) and int(m.group(3)) < 2):
            raise MixdeployError(f"bad depthwise choice {text!r}; use split, fold or fold<=K, optionally "
                                 "@A (A >= 2) and +block3, +block5, +strips or +pairs")
        merge = 0 if m.group(1) == "split" else int(m.group(2)) if m.group(2) else 10**6
        return cls(merge, m.group(4), int(m.group(3) or 0))

    def __str__(self) -> str:
        base = "split" if self.merge == 0 else "fold" if self.merge >= 10**6 else f"fold<={self.merge}"
        return base + (f"@{self.align}" if self.align else "") + (f"+{self.cut}" if self.cut else "")

    def ends(self, kernels: list[int], channels: list[int]) -> list[int]:
        """Where each segment ends, in channels, for groups of these (dense) kernels and channel counts."""
        ends: list[int] = []
        for i, (k, total) in enumerate(zip(kernels, itertools.accumulate(channels))):
            if ends and k <= self.merge and kernels[i - 1] <= self.merge:
                ends[-1] = total
            else:
                ends.append(total)
        if self.align:
            ends = sorted({e // self.align * self.align for e in ends[:-1]} - {0}) + ends[-1:]
        return ends


def depthwise_candidates(kernels: list[int], channels: list[int]) -> list[str]:
    """Every distinct lowering of a depthwise MixConv with these (dense) kernel sizes and channel
    counts (+pairs only with kernels up to PAIRS_MAX; @ALIGN where it moves a segment boundary)."""
    merges = ["split"] + [f"fold<={k}" for k in sorted(set(kernels))[1:-1]] + (["fold"] if len(kernels) > 1 else [])
    largest = max(kernels)
    cuts = [cut for cut, b in PIECES.items() if b < largest and (cut != "pairs" or largest <= PAIRS_MAX)]
    choices = [DepthwiseChoice.parse(merge) for merge in merges]
    seen = {tuple(c.ends(kernels, channels)) for c in choices}  # the ends alone fix the segments
    out = []
    for merge, choice in zip(merges, choices):
        out.append(merge)
        out += [f"{merge}+{cut}" for cut in cuts if choice.merge > 0 or any(k > PIECES[cut] for k in kernels)]
        aligned = DepthwiseChoice(choice.merge, None, ALIGN)
        ends = tuple(aligned.ends(kernels, channels))
        if ends not in seen:
            seen.add(ends)
            out.append(str(aligned))
    return out


@dataclass
class Plan:
    """Layer name -> choice, plus where the plan came from and what each layer was (shapes: layer
    name -> lower.signature, so that a plan made for another model is refused)."""

    layers: dict[str, str] = field(default_factory=dict)
    target: str = "onnxruntime"
    source: str = "auto"
    estimates_ms: dict[str, float] = field(default_factory=dict)
    shapes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"version": 1, "target": self.target, "source": self.source, "layers": self.layers,
                "estimates_ms": self.estimates_ms, "shapes": self.shapes}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
            raise MixdeployError("a plan is a JSON object with a 'layers' mapping of layer name -> choice")
        if data.get("version", 1) != 1 or isinstance(data.get("version"), bool):
            raise MixdeployError(f"plan version {data['version']!r} is not one this mixdeploy reads (it writes version 1)")
        estimates, shapes = data.get("estimates_ms", {}), data.get("shapes", {})
        if (not isinstance(data.get("target", ""), str) or not isinstance(data.get("source", ""), str)
                or not isinstance(estimates, dict) or not all(is_number(v) and v >= 0 for v in estimates.values())
                or not isinstance(shapes, dict) or not all(isinstance(v, str) for v in shapes.values())):
            raise MixdeployError("a plan's target and source are strings, its estimates_ms maps layer names to "
                                 "milliseconds, 0 or more, and its shapes layer names to text (or leave them out)")
        return cls(dict(data["layers"]), data.get("target", "onnxruntime"), data.get("source", "file"), dict(estimates),
                   dict(shapes))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise MixdeployError(f"cannot read plan {path}: {exc}; pass auto, split, fold or a plan JSON file") from None
        return cls.from_dict(data)
