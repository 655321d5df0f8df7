"""What a .tflite file holds: ops by type, what XNNPACK takes, tensors; and its embedded metadata."""
from __future__ import annotations

import json

import numpy as np
from collections import Counter
from pathlib import Path

METADATA_NAME = "mixdeploy"


def delegation(path: str | Path) -> dict:
    """Ops by type and how many of them the XNNPACK delegate takes (from its DELEGATE nodes' inputs and outputs)."""
    from ai_edge_litert.interpreter import Interpreter

    from devices.runners import quiet_native_stderr

    with quiet_native_stderr():
        interp = Interpreter(model_path=str(path), num_threads=1)
        interp.allocate_tensors()
    native = interp._interpreter
    nodes = [(native.NodeName(i), set(native.NodeInputs(i)), set(native.NodeOutputs(i))) for i in range(native.NumNodes())]
    originals = [n for n in nodes if n[0] != "DELEGATE"]
    producer = {t: i for i, (_, _, outs) in enumerate(originals) for t in outs}
    taken = set()
    for _, inputs, outputs in (n for n in nodes if n[0] == "DELEGATE"):
        stack = [producer[t] for t in outputs if t in producer]
        while stack:
            i = stack.pop()
            if i in taken:
                continue
            taken.add(i)
            stack += [producer[t] for t in originals[i][1] if t in producer and t not in inputs]
    left = Counter(originals[i][0] for i in range(len(originals)) if i not in taken)
    return {"ops": dict(Counter(n[0] for n in originals).most_common()), "nodes": len(originals),
            "delegated": len(taken), "partitions": len(nodes) - len(originals), "not_delegated": dict(left)}


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
    buffer.data = np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != METADATA_NAME.encode()] + [entry]
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
            return json.loads(bytes(model.buffers[entry.buffer].data))
    return {}
