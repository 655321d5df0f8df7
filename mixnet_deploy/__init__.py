"""mixdeploy core: load MixNet models, lower them into deploy graphs, measure parity."""
from .errors import MixdeployError
from .mixconv import MixConv, split_channels
from .dropin import replace_depthwise
from .models import LoadedModel, known_models, load_model
from .preprocess import PreprocessConfig
from .complexity import Complexity, count

__version__ = "0.1.0"
__all__ = [
    "MixdeployError", "MixConv", "split_channels", "replace_depthwise", "LoadedModel",
    "known_models", "load_model", "PreprocessConfig", "Complexity", "count", "__version__",
]
