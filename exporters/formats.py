"""The export formats: how each writes, runs and tags its files."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from torch import nn

from mixnet_deploy import strict_json

if TYPE_CHECKING:
    from devices.runners import LiteRtRunner, OrtRunner


class Format(Protocol):
    suffix: str
    target: str  # the runtime whose cost model picks the plan
    input_layout: str  # nchw or nhwc, when the export options name none
    runtime_name: str

    def write(self, module: nn.Module, input_size: tuple[int, int, int], path: Path, options: dict) -> None: ...
    def run(self, path: Path, x: np.ndarray) -> np.ndarray: ...
    def latency(self, path: Path, x: np.ndarray, runs: int = 20) -> float: ...
    def tolerance(self, options: dict) -> dict: ...
    def add_metadata(self, path: Path, metadata: dict) -> None: ...


class _Runs:
    """run and latency through the format's runner (files may carry a temporary suffix)."""

    def runner(self, path: Path) -> OrtRunner | LiteRtRunner: ...

    def run(self, path: Path, x: np.ndarray) -> np.ndarray:
        runner = self.runner(path)
        return runner.run(runner.feed(x))

    def latency(self, path: Path, x: np.ndarray, runs: int = 20) -> float:
        runner = self.runner(path)
        return float(np.median(runner.time(runner.feed(x[:1]), runs=runs)))


class OnnxFormat(_Runs):
    suffix, target, runtime_name = ".onnx", "onnxruntime", "ONNX Runtime"
    input_layout = "nchw"  # the default; --input-layout nhwc adds one Transpose

    def write(self, module: nn.Module, input_size: tuple[int, int, int], path: Path, options: dict) -> None:
        from .onnx_export import write_onnx

        write_onnx(module, input_size, path, opset=options.get("opset", 18), dynamic_batch=options.get("dynamic_batch", False),
                   scale_weights=True, input_layout=options.get("input_layout") or self.input_layout)

    def runner(self, path: Path) -> OrtRunner:
        from devices.runners import OrtRunner

        return OrtRunner(path)

    def tolerance(self, options: dict) -> dict:
        return {"max_rel": 1e-5}

    def add_metadata(self, path: Path, metadata: dict) -> None:
        import onnx

        model = onnx.load(str(path))
        kept = [e for e in model.metadata_props if e.key not in metadata]  # replaced, never a duplicate key
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else strict_json.dumps(value)
        onnx.save(model, str(path))


class TfliteFormat(_Runs):
    suffix, target, runtime_name = ".tflite", "litert", "LiteRT (XNNPACK)"
    input_layout = "nhwc"  # the default; --input-layout nchw adds one TRANSPOSE

    def write(self, module: nn.Module, input_size: tuple[int, int, int], path: Path, options: dict) -> None:
        from .tflite_export import write_tflite

        write_tflite(module, input_size, path, fp16=options.get("fp16", False),
                     input_layout=options.get("input_layout") or self.input_layout)

    def runner(self, path: Path) -> LiteRtRunner:
        from devices.runners import LiteRtRunner

        return LiteRtRunner(path)

    def tolerance(self, options: dict) -> dict:
        return {"min_cosine": 0.9999, "min_top1": 0.99} if options.get("fp16") else {"max_rel": 1e-5}

    def add_metadata(self, path: Path, metadata: dict) -> None:
        from .tflite_inspect import write_metadata
        from .tflite_export import OUTPUT_NAME

        write_metadata(path, metadata, OUTPUT_NAME)


FORMATS: dict[str, Format] = {"onnx": OnnxFormat(), "tflite": TfliteFormat()}
