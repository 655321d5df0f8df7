"""SHA-256 digests of what an export was made from: weight files, code files, a module's tensors."""
from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn


def state_sha256(module: nn.Module) -> str:
    """The SHA-256 of a module's tensors (names and bytes, in state_dict order), hex."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
