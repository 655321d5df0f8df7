"""A model's preprocessing, as timm's pretrained config states it."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass(frozen=True)
class PreprocessConfig:
    """What an image must go through before the model sees it (NCHW, float32)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bicubic"

    @classmethod
    def from_model(cls, model: nn.Module) -> "PreprocessConfig":
        """Resolve the config the way timm's eval transform does."""
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=model)
        return cls(
            input_size=tuple(cfg["input_size"]),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            crop_pct=float(cfg["crop_pct"]),
            crop_mode=cfg.get("crop_mode", "center"),
            interpolation=cfg["interpolation"],
        )

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)
