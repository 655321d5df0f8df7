"""The export formats: how each writes, runs, inspects and tags its files."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Protocol

import numpy as np
from torch import nn


class Format(Protocol):
    suffix: str
    target: str  # the runtime whose cost model picks the plan
    runtime_name: str

    def write(self, module: nn.Module, input_size: tuple[int, int, int], path: Path, options: dict) -> None: ...
    def run(self, path: Path, x: np.ndarray) -> np.ndarray: ...
    def tolerance(self, options: dict) -> dict: ...
    def add_metadata(self, path: Path, metadata: dict) -> None: ...
    def ops(self, path: Path) -> dict[str, int]: ...


class OnnxFormat:
    suffix, target, runtime_name = ".onnx", "onnxruntime", "ONNX Runtime"

    def write(self, module: nn.Module, input_size: tuple[int, int, int], path: Path, options: dict) -> None:
        from .onnx_export import write_onnx

        write_onnx(module, input_size, path, opset=options.get("opset", 18), dynamic_batch=options.get("dynamic_batch", False))

    def run(self, path: Path, x: np.ndarray) -> np.ndarray:
        from devices.local_runtime import OrtRunner

        return OrtRunner(path).run(x)

    def tolerance(self, options: dict) -> dict:
        return {"max_rel": 1e-5}

    def add_metadata(self, path: Path, metadata: dict) -> None:
        import onnx

        model = onnx.load(str(path))
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
        onnx.save(model, str(path))

    def ops(self, path: Path) -> dict[str, int]:
        import onnx

        return dict(Counter(n.op_type for n in onnx.load(str(path)).graph.node).most_common())


FORMATS: dict[str, Format] = {"onnx": OnnxFormat()}
