"""Loading a model by name: timm's MixNets, MixConv drop-ins of other timm models, and the user's
own networks (FILE.py:FACTORY or MODULE:FACTORY, a function that returns the model)."""
from __future__ import annotations

import difflib
import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .checkpoint import apply_state_dict, read_checkpoint, unwrapped
from .digests import file_sha256, state_sha256
from .dropin import PREFIX as DROPIN_PREFIX
from .dropin import create_dropin
from .errors import MixdeployError
from .own_network import build as build_own
from .own_network import check_rebuilt, check_source, check_unchanged, own_network
from .preprocess import MAX_SIDE, MIN_SIDE, PreprocessConfig

MIXNETS = (
    "mixnet_s", "mixnet_m", "mixnet_l", "mixnet_xl", "mixnet_xxl",
    "tf_mixnet_s", "tf_mixnet_m", "tf_mixnet_l",
)
DROPIN_EXAMPLES = ("mixconv_mobilenetv2_100",)


@dataclass
class LoadedModel:
    """A model in eval mode with what later steps need to know about it."""

    name: str
    module: nn.Module
    preprocess: PreprocessConfig
    labels: list[str] | None
    weights: str  # "random-init", "random-init+calibrated-bn", "pretrained" or the checkpoint's absolute path
    num_classes: int  # the classifier's outputs
    sha256: str | None = None  # of the checkpoint file, or of timm's pretrained tensors (state_sha256)
    code: dict[str, str] | None = None  # the user's own network: its code files -> SHA-256
    calibrated_at: list[int] | None = None  # the input size --calibrate-bn set the statistics at

    @property
    def random_init(self) -> bool:
        return self.weights.startswith("random-init")

    def metadata(self) -> dict:
        """What an exported file records so that reload() can rebuild this model."""
        return {"mixdeploy.model": self.name, "mixdeploy.weights": self.weights,
                "mixdeploy.preprocess": self.preprocess.to_dict(), "mixdeploy.labels": self.labels,
                **({"mixdeploy.weights_sha256": self.sha256} if self.sha256 else {}),
                **({"mixdeploy.code": self.code} if self.code else {}),
                **({"mixdeploy.calibrated_at": self.calibrated_at} if self.calibrated_at else {})}


def known_models() -> tuple[str, ...]:
    """Names accepted everywhere a MODEL is asked for (drop-ins: 'mixconv_' + any timm model)."""
    return MIXNETS + DROPIN_EXAMPLES


def file_stem(name: str) -> str:
    """The default output file name (without suffix) for a model: its name, or an own network's factory."""
    own = own_network(name)
    return own[1] if own else name


def _check_name(name: str) -> None:
    import timm

    own = own_network(name)
    if own:
        check_source(own[0])
        return
    base = name.removeprefix(DROPIN_PREFIX)
    if name.startswith(DROPIN_PREFIX) and base in MIXNETS:
        raise MixdeployError(f"{name}: {base} already has MixConv layers; use {base}")
    if name in MIXNETS or (name.startswith(DROPIN_PREFIX) and base in timm.list_models()):
        return
    if not name.strip():
        raise MixdeployError(f"the model name is empty; give one of {', '.join(known_models())}")
    if "/" in name or Path(name).exists():  # a path, not a name
        raise MixdeployError(f"{name} is a path, not a model name (known: {', '.join(known_models())}); give weights "
                             "with --checkpoint PATH; info, quantize and bench take exported .onnx/.tflite files")
    close = difflib.get_close_matches(name, known_models(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known_models())}"
    raise MixdeployError(f"unknown model {name!r}; {hint} (a MixConv drop-in is 'mixconv_' + a timm model name; "
                         "your own network is FILE.py:FACTORY or MODULE:FACTORY)")


def _build(name: str, num_classes: int | None, pretrained: bool) -> nn.Module:
    import timm

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if name.startswith(DROPIN_PREFIX):
        try:
            return create_dropin(name, **kwargs)
        except ValueError as exc:
            raise MixdeployError(f"{name}: {exc}") from None
    if not pretrained:
        return timm.create_model(name, **kwargs)
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    advice = f"download the {name} weights on a connected machine and pass the file with --checkpoint PATH"
    overlay = {}
    if offline := _offline(host):  # a download's copy in the Hugging Face cache (the hub would retry for a minute)
        cached = _hub_cached(name)
        if cached is None:
            raise MixdeployError(f"cannot download pretrained {name}: {offline} and the Hugging Face cache has no "
                                 f"copy; {advice}") from None
        overlay = {"pretrained_cfg_overlay": {"file": cached}}
    try:
        return timm.create_model(name, pretrained=True, **overlay, **kwargs)
    except Exception as exc:  # hub and network errors come in many types
        raise MixdeployError(f"downloading pretrained {name} failed ({type(exc).__name__}); {advice}") from None


def _offline(host: str) -> str | None:
    """Why the hub cannot be reached: HF_HUB_OFFLINE set, or `host` not resolvable here (behind a
    proxy only the proxy resolves it: the hub is asked then); None when it may be."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"{host} is unreachable (offline?)"
    return None


def _hub_cached(name: str) -> str | None:
    """The path of `name`'s pretrained weights in the Hugging Face cache, if a download left them there."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    repo = get_pretrained_cfg(name).hf_hub_id
    found = [try_to_load_from_cache(repo, f) for f in ("model.safetensors", "pytorch_model.bin")] if repo else []
    return next((f for f in found if isinstance(f, str)), None)


def _classifier_weights(name: str) -> list[str]:
    """Where a checkpoint of `name` keeps its classifier's weight: timm's config of the model (of the
    base model for a drop-in) says, else the usual places."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name.removeprefix(DROPIN_PREFIX))
    named = getattr(cfg, "classifier", None) or ()
    return [f"{c}.weight" for c in ((named,) if isinstance(named, str) else named)] + [
        "classifier.weight", "head.fc.weight", "fc.weight"]


def _labels(num_classes: int) -> list[str] | None:
    if num_classes != 1000:
        return None
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(num_classes)]


RANDOM_SEED = 0
RANDOM_INIT, CALIBRATED = "random-init", "random-init+calibrated-bn"


def check_request(name: str, checkpoint: str | Path | None = None, pretrained: bool = False,
                  calibrate_bn: bool = False, input_size: tuple[int, int] | None = None) -> None:
    """What load_model checks before any work: the name, the input size and how the options combine
    (commands call it before reaching a device, so that a typo fails at once)."""
    _check_name(name)
    if input_size is not None and min(input_size) < MIN_SIDE:
        raise MixdeployError(f"input size {input_size[0]}x{input_size[1]} is too small: MixNets downsample 32x, "
                             f"give at least {MIN_SIDE}x{MIN_SIDE}")
    if input_size is not None and max(input_size) > MAX_SIDE:
        raise MixdeployError(f"input size {input_size[0]}x{input_size[1]} is too large: give at most "
                             f"{MAX_SIDE}x{MAX_SIDE} (classifiers are trained at 224-600)")
    if checkpoint is not None and pretrained:
        raise MixdeployError("pass either --pretrained or --checkpoint, not both")
    if calibrate_bn and (checkpoint is not None or pretrained):
        raise MixdeployError("--calibrate-bn is for random-init models; trained weights keep their statistics")
    if pretrained and name.startswith(DROPIN_PREFIX):
        raise MixdeployError(f"{name} has no pretrained weights (its depthwise convs became MixConvs); pass "
                             "--checkpoint PATH with weights trained for it")
    if pretrained and own_network(name):
        raise MixdeployError("--pretrained is for timm's models; pass your network's weights with --checkpoint PATH")
    if pretrained and not has_pretrained(name):
        raise MixdeployError(f"timm publishes no pretrained weights for {name}; pass --checkpoint PATH with weights "
                             "trained for it")


def has_pretrained(name: str) -> bool:
    """Whether timm publishes weights for `name` (not for mixnet_xxl, a drop-in or an own network)."""
    if name.startswith(DROPIN_PREFIX) or own_network(name):
        return False
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return bool(cfg and (cfg.hf_hub_id or cfg.url))


def load_model(name: str, checkpoint: str | Path | None = None, pretrained: bool = False,
               calibrate_bn: bool = False, input_size: tuple[int, int] | None = None) -> LoadedModel:
    """Build `name` in eval mode: timm's pretrained weights, a local checkpoint, or random-init
    (always from the same seed, so that a random-init export can be rebuilt from its metadata;
    calibrate_bn sets its BatchNorm statistics from the shipped photos). input_size (height, width)
    replaces the model's own input resolution (MixNets pool globally, so any size of 32 or more runs)."""
    check_request(name, checkpoint, pretrained, calibrate_bn, input_size)
    own = own_network(name)
    if own and own[0].endswith(".py"):  # recorded so that it is found from any folder
        name = f"{Path(own[0]).resolve()}:{own[1]}"
    state, extras = read_checkpoint(checkpoint) if checkpoint is not None else (None, {})
    arch = str(extras.get("arch", "")).split(".")[0]  # timm's train.py records the model it trained
    if arch in known_models() and name in known_models() and arch != name:  # tf_ and plain MixNets share keys
        raise MixdeployError(f"checkpoint {checkpoint} was trained as {arch} (its 'arch' entry), not {name}; "
                             f"pass {arch} as the model")
    num_classes = None
    if state is not None and not own:
        state = unwrapped(state)  # timm's keys start with no wrapper's prefix
        head = [k for k in _classifier_weights(name) if k in state]
        if head and state[head[0]].ndim != 2:
            raise MixdeployError(f"checkpoint {checkpoint}: {head[0]} has shape {tuple(state[head[0]].shape)}; a "
                                 "classifier weight is (classes, features): is it a checkpoint of another architecture?")
        num_classes = state[head[0]].shape[0] if head else None
    with torch.random.fork_rng():
        torch.manual_seed(RANDOM_SEED)
        module, code = build_own(*own) if own else (_build(name, num_classes, pretrained), None)
    if state is not None:
        apply_state_dict(module, state, str(checkpoint), name)
    module.eval()
    weights = (str(Path(checkpoint).resolve()) if checkpoint is not None else "pretrained" if pretrained
               else CALIBRATED if calibrate_bn else RANDOM_INIT)
    preprocess = PreprocessConfig.from_model(module)
    if "preprocess" in extras:
        preprocess = preprocess.updated(extras["preprocess"], f"checkpoint {checkpoint}")
        stem = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
        if not own and stem is not None and stem.in_channels != preprocess.input_size[0]:  # own ones: _classes says
            raise MixdeployError(f"checkpoint {checkpoint}: its preprocess gives {preprocess.input_size[0]} input "
                                 f"channel(s); {name} takes {stem.in_channels}")
    if input_size is not None:
        preprocess = replace(preprocess, input_size=(preprocess.input_size[0], *input_size))
    sha256 = file_sha256(checkpoint) if checkpoint else state_sha256(module) if pretrained else None
    # an own network or a drop-in may run at no other size (a window partition): tried once, here
    tried = own or name.startswith(DROPIN_PREFIX)
    classes = _classes(name, module, preprocess.input_size) if tried else module.num_classes  # timm's say
    loaded = LoadedModel(name, module, preprocess, None, weights, classes, sha256, code)
    if calibrate_bn:  # at the input size the model is exported for
        calibrate_batchnorm(module, preprocess)
        loaded.calibrated_at = list(preprocess.input_size)
    labels = extras["labels"] if "labels" in extras else _labels(classes)
    if labels is not None and not (isinstance(labels, (list, tuple)) and len(labels) == classes
                                   and all(isinstance(label, str) for label in labels)):
        raise MixdeployError(f"checkpoint {checkpoint}: 'labels' must be a list of {classes} class names "
                             "(one per output of the classifier)")
    loaded.labels = list(labels) if labels is not None else None
    return loaded


def _classes(name: str, module: nn.Module, size: tuple[int, int, int]) -> int:
    """The classes of the user's own network or a drop-in, which must map an image batch of `size`
    to one tensor of logits (batch, classes)."""
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *size))
    except Exception as exc:
        advice = ("give a size it runs at with --input-size" if name.startswith(DROPIN_PREFIX) else
                  "give its input size with --input-size, or its input_size (channels too), mean and std in a "
                  "pretrained_cfg on the module or a checkpoint's preprocess")
        raise MixdeployError(f"{name} fails on a (2, {', '.join(map(str, size))}) input: {type(exc).__name__}: "
                             f"{exc}; {advice}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or len(out) != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise MixdeployError(f"{name} returns {shape}; mixdeploy exports classifiers returning logits "
                             "(batch, classes)")
    return out.shape[1]


def calibrate_batchnorm(model: nn.Module, preprocess: PreprocessConfig) -> None:
    """Set every BatchNorm's statistics to those of the shipped photos (and their mirror images):
    a random-init model then has activations of a sensible scale, as a trained one would."""
    from .preprocess import sample_photos

    photos = sample_photos(preprocess)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    model.eval()  # dropout and drop-path stay off (a BatchNormAct2d's own too): the model as it runs
    try:
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches below
            bn.training = True
        with torch.no_grad():
            model(torch.cat([photos, photos.flip(3)]))
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum, bn.training = momentum, False


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics (random-init models have mean 0, var 1), so that
    folding them is really exercised by checks and benchmarks without trained weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                bn.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                bn.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model


def reload(meta: dict) -> LoadedModel:
    """The model an export's metadata names, rebuilt from its recorded weights, with the
    preprocessing (input size included) the file was exported for."""
    weights, name = meta["mixdeploy.weights"], meta["mixdeploy.model"]
    check_unchanged(meta.get("mixdeploy.code") or {})  # before the user's code runs again
    size = meta.get("mixdeploy.preprocess", {}).get("input_size")
    # built at the exported size (a network may run at no other); a calibrated export of an earlier
    # mixdeploy, without calibrated_at, had its statistics set at the model's own size
    old_calibration = weights == CALIBRATED and "mixdeploy.calibrated_at" not in meta
    # a size out of --input-size's bounds can only be the network's own (its pretrained_cfg): built as is
    own_size = size and not MIN_SIDE <= min(size[1:]) <= max(size[1:]) <= MAX_SIDE
    at = tuple(size[1:]) if size and not old_calibration and not own_size else None
    if weights in (RANDOM_INIT, CALIBRATED, "pretrained"):
        loaded = load_model(name, pretrained=weights == "pretrained", calibrate_bn=weights == CALIBRATED, input_size=at)
        if meta.get("mixdeploy.weights_sha256") not in (None, loaded.sha256):
            raise MixdeployError(f"timm's pretrained {name} weights differ from those the export was made from "
                                 "(another timm version or weights tag?); export the model again, or pass the model name")
    elif not Path(weights).is_file():
        raise MixdeployError(f"the export was made from {weights}, which is gone; pass the model name and --checkpoint")
    elif meta.get("mixdeploy.weights_sha256") not in (None, file_sha256(weights)):
        raise MixdeployError(f"{weights} has changed since the export was made from it (its SHA-256 differs); "
                             "export the model again, or pass the model name and --checkpoint")
    else:
        loaded = load_model(name, weights, input_size=at)
    check_rebuilt(meta.get("mixdeploy.code") or {}, loaded.code or {}, name)
    if "mixdeploy.preprocess" in meta:
        loaded.preprocess = PreprocessConfig.from_dict(meta["mixdeploy.preprocess"])
    return loaded
