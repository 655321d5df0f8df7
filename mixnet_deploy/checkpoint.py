"""Reading a local checkpoint into a model, with errors that say what is wrong."""
from __future__ import annotations

import argparse
import contextlib
import textwrap
import warnings
import zipfile
from pathlib import Path
from typing import Collection

import torch
from torch import nn

from .errors import MixdeployError

WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of a .pth/.pt/.safetensors file (a bare state_dict or a training checkpoint holding one),
    and the checkpoint's 'preprocess' and 'labels' entries when it has them."""
    path = Path(path)
    if not path.exists():
        raise MixdeployError(f"checkpoint {path} does not exist; pass the path of a .pth, .pt or .safetensors file")
    if path.is_dir():
        raise MixdeployError(f"checkpoint {path} is a directory; pass the weights file inside it (.pth, .pt or .safetensors)")
    try:
        with path.open("rb") as f:
            head = f.read(2)
    except OSError as exc:
        raise MixdeployError(f"checkpoint {path} cannot be opened ({exc.strerror}); check its permissions") from None
    if path.suffix != ".safetensors" and head != b"PK" and head[:1] != b"\x80":  # zip (torch.save) or legacy pickle
        raise MixdeployError(f"checkpoint {path} is not a PyTorch file (torch.save writes a zip archive); "
                             "pass a state_dict saved with torch.save or a .safetensors file")
    if zipfile.is_zipfile(path):  # its end record only: a damaged archive is named by torch.load below
        with contextlib.suppress(zipfile.BadZipFile), zipfile.ZipFile(path) as archive:
            if any(n.endswith("/constants.pkl") for n in archive.namelist()):
                raise MixdeployError(f"checkpoint {path} is a TorchScript archive (torch.jit.save); save "
                                     "model.state_dict() with torch.save instead")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # timm's train.py saves its argparse Namespace beside the weights: allowed, nothing else
            with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
                warnings.simplefilter("ignore")  # torch warns about pickle protocols before failing in its own words
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        if "Unsupported operand" in str(exc):
            raise MixdeployError(f"checkpoint {path} is a plain pickle (protocol 4 or newer, not torch.save's zip "
                                 "format), which PyTorch's weights-only loader cannot read; save the state_dict with "
                                 "torch.save(model.state_dict(), path) or as .safetensors") from None
        if "Weights only load failed" in str(exc):
            raise MixdeployError(f"checkpoint {path} cannot be read: it holds pickled Python objects, not only "
                                 "tensors (a whole model?), and mixdeploy loads weights only; save "
                                 "model.state_dict() with torch.save") from None
        first = textwrap.shorten(str(exc).strip().splitlines()[0], 120, placeholder=" ...") if str(exc).strip() else ""
        raise MixdeployError(
            f"checkpoint {path} cannot be read as PyTorch weights ({type(exc).__name__}{': ' + first if first else ''}); "
            "pass a state_dict saved with torch.save or a .safetensors file"
        ) from None
    # entries beside the weights (a bare state_dict may have a buffer called labels: a tensor stays)
    extras = {k: state.pop(k) for k in ("preprocess", "labels", "arch")
              if isinstance(state, dict) and k in state and not isinstance(state[k], torch.Tensor)}
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MixdeployError(
            f"checkpoint {path} holds no state_dict (looked at the top level and under {', '.join(WRAPPER_KEYS)})"
        )
    return state, extras


WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DataParallel/DDP, torch.compile, Lightning


def unwrapped(state: dict[str, torch.Tensor], keys: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """`state` with the wrappers' key prefixes removed, nested in any order: all of them, or with the
    model's `keys` known, as far as that makes its keys the model's (a network of the user's own may
    name its parts `model.` itself)."""
    best, keys = state, None if keys is None else set(keys)
    while state and (prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        if keys is None or len(keys.intersection(state)) > len(keys.intersection(best)):
            best = state
    return best


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Load `state` into `model` strictly (BatchNorm's num_batches_tracked may be missing, as PyTorch
    allows); a mismatch names the first missing and unexpected keys."""
    own = model.state_dict()
    # PyTorch fills in a missing num_batches_tracked only for state_dicts of old versions: the model's own stand in
    state = {**{k: v for k, v in own.items() if k.endswith(".num_batches_tracked")}, **unwrapped(state, own.keys())}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    cfg = getattr(model, "pretrained_cfg", None)
    head = cfg.get("classifier") if isinstance(cfg, dict) else None  # timm's name(s) of its classifier(s)
    heads = tuple(f"{h}." for h in ((head,) if isinstance(head, str) else head or ()))
    if missing and not unexpected and heads and all(k.startswith(heads) for k in missing):
        raise MixdeployError(f"checkpoint {source} has no classifier ({missing[0]}): the weights of a feature "
                             "extractor? mixdeploy exports classifiers; save the model with its head")
    if missing or unexpected:
        parts = [f"checkpoint {source} does not fit {arch}"]
        if missing:
            parts.append(f"{len(missing)} missing keys, first {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, first {unexpected[0]!r}")
        raise MixdeployError("; ".join(parts) + "; is it a checkpoint of another architecture?")
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            raise MixdeployError(
                f"checkpoint {source} does not fit {arch}: {key} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state)
