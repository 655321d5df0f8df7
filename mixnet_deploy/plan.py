"""Lowering plans: one choice per MixConv layer, saved as JSON.

Depthwise MixConv choices: "split" (Split, one depthwise conv per group, Concat), "fold" (one
conv of the largest kernel, smaller kernels zero-padded and centred), "fold<=K" (fold only the
adjacent groups with kernels up to K), each optionally "+blockB" (cut every kernel larger than B
into B x B pieces whose outputs add up). Grouped 1x1 MixConv choices: "grouped" (one Conv with
groups=g), "dense" (one Conv with a block-diagonal weight), "split".
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MixdeployError

_DEPTHWISE = re.compile(r"^(split|fold|fold<=(\d+))(?:\+block(\d+))?$")
POINTWISE_CHOICES = ("grouped", "dense", "split")
BLOCKS = (3, 5)


@dataclass(frozen=True)
class DepthwiseChoice:
    """merge: kernels up to this size share one conv (0: none, a large number: all); block: piece size."""

    merge: int
    block: int | None

    @classmethod
    def parse(cls, text: str) -> "DepthwiseChoice":
        m = _DEPTHWISE.match(text)
        if not m:
            raise MixdeployError(f"bad depthwise choice {text!r}; use split, fold or fold<=K, optionally +block3 / +block5")
        merge = 0 if m.group(1) == "split" else int(m.group(2)) if m.group(2) else 10**6
        return cls(merge, int(m.group(3)) if m.group(3) else None)

    def __str__(self) -> str:
        base = "split" if self.merge == 0 else "fold" if self.merge >= 10**6 else f"fold<={self.merge}"
        return base + (f"+block{self.block}" if self.block else "")


def depthwise_candidates(kernels: list[int]) -> list[str]:
    """Every distinct lowering of a depthwise MixConv with these (dense) kernel sizes."""
    merges = ["split"] + [f"fold<={k}" for k in sorted(set(kernels))[1:-1]] + (["fold"] if len(kernels) > 1 else [])
    out = []
    for merge in merges:
        choice = DepthwiseChoice.parse(merge)
        largest = max(kernels)
        out.append(merge)
        out += [f"{merge}+block{b}" for b in BLOCKS if b < largest and (choice.merge > 0 or any(k > b for k in kernels))]
    return out


@dataclass
class Plan:
    """Layer name -> choice, plus where the plan came from."""

    layers: dict[str, str] = field(default_factory=dict)
    target: str = "onnxruntime"
    source: str = "auto"
    estimates_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"version": 1, "target": self.target, "source": self.source, "layers": self.layers,
                "estimates_ms": self.estimates_ms}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
            raise MixdeployError("a plan is a JSON object with a 'layers' mapping of layer name -> choice")
        return cls(dict(data["layers"]), data.get("target", "onnxruntime"), data.get("source", "file"),
                   dict(data.get("estimates_ms", {})))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise MixdeployError(f"cannot read plan {path}: {exc}; pass auto, split, fold or a plan JSON file") from None
        return cls.from_dict(data)
