"""mixdeploy core: load MixNet models, lower them into deploy graphs, measure parity.

The names below are imported from their modules on first use, so that `mixdeploy --help` and
usage errors do not wait seconds for PyTorch to load."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
_MODULES = {"MixdeployError": "errors", "MixConv": "mixconv", "split_channels": "mixconv",
            "replace_depthwise": "dropin", "LoadedModel": "models", "known_models": "models", "load_model": "models",
            "PreprocessConfig": "preprocess", "Complexity": "complexity", "count": "complexity"}
__all__ = ["MixdeployError", "MixConv", "split_channels", "replace_depthwise", "LoadedModel", "known_models",
           "load_model", "PreprocessConfig", "Complexity", "count", "__version__"]


def __getattr__(name: str) -> object:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .complexity import Complexity, count
    from .dropin import replace_depthwise
    from .errors import MixdeployError
    from .mixconv import MixConv, split_channels
    from .models import LoadedModel, known_models, load_model
    from .preprocess import PreprocessConfig
