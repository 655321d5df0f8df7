"""What a .tflite file holds: ops by type, what XNNPACK takes, tensors; and its embedded metadata."""
from __future__ import annotations

import json

import numpy as np
from pathlib import Path

from mixnet_deploy import strict_json
from mixnet_deploy.errors import MixdeployError

METADATA_NAME = "mixdeploy"


def delegation(path: str | Path) -> dict:
    """Ops by type and how many of them the XNNPACK delegate takes (see LiteRtRunner.delegation)."""
    from devices.runners import LiteRtRunner

    return LiteRtRunner(path).delegation()


def delegation_text(d: dict) -> str:
    """A delegation dict as a phrase: `XNNPACK takes 62 of 64 nodes in 2 partitions (left to the CPU
    kernels: HARD_SWISH ×1)`; nodes may be None (benchmark_model builds that do not print them)."""
    nodes = "—" if d.get("nodes") is None else d["nodes"]
    left = ", ".join(f"{op} ×{n}" for op, n in (d.get("not_delegated") or {}).items())
    return (f"XNNPACK takes {d['delegated']} of {nodes} nodes"
            + (f" in {d['partitions']} partitions" if (d.get("partitions") or 1) > 1 else "")
            + (f" (left to the CPU kernels: {left})" if left else ""))


def tensors(path: str | Path) -> dict:
    """Input and output tensors: name, shape, type, quantization."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))

    def describe(d: dict) -> dict:
        return {"name": d["name"], "shape": d["shape"].tolist(), "dtype": d["dtype"].__name__,
                "quantization": list(d["quantization"])}

    return {"inputs": [describe(d) for d in interp.get_input_details()],
            "outputs": [describe(d) for d in interp.get_output_details()]}


def _model(path: Path):
    from .tflite_export import tensorflow

    tensorflow()
    from tensorflow.lite.python import schema_py_generated as schema

    return schema, schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(path.read_bytes(), 0))


def write_metadata(path: str | Path, metadata: dict, output_name: str | None = None) -> None:
    """Embed `metadata` as JSON in the model's metadata table (and name the output tensor)."""
    import flatbuffers

    path = Path(path)
    schema, model = _model(path)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(strict_json.dumps(metadata).encode(), dtype=np.uint8)
    ours = next((m for m in model.metadata or [] if m.name == METADATA_NAME.encode()), None)
    if ours is None:  # a first tag adds a buffer; a re-tag replaces its own, leaving nothing behind
        ours = schema.MetadataT()
        ours.name, ours.buffer = METADATA_NAME, len(model.buffers)
        model.buffers.append(buffer)
        model.metadata = [*(model.metadata or []), ours]
    else:
        model.buffers[ours.buffer] = buffer
    if output_name:
        graph = model.subgraphs[0]
        graph.tensors[graph.outputs[0]].name = output_name
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))


def read_metadata(path: str | Path) -> dict:
    """The metadata mixdeploy embedded, or {} for a file that is not ours."""
    schema, model = _model(Path(path))
    for entry in model.metadata or []:
        if entry.name == METADATA_NAME.encode():
            try:
                meta = json.loads(bytes(model.buffers[entry.buffer].data))
            except (ValueError, TypeError, IndexError):
                meta = None
            if not isinstance(meta, dict):
                raise MixdeployError(f"{path}: its mixdeploy metadata is damaged (not a JSON object); export the file "
                                     "again")
            return meta
    return {}
