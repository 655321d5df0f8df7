"""Layers that --max-drop may keep in float, most sensitive first: the squeeze-excite gates, the
swish activations, the first convolution, the classifier (in TFLite, by op type: fewer groups)."""
from __future__ import annotations

from pathlib import Path

# TFLite keeps float by op type (the converter's denylist): the squeeze-excite gates and swish share
# LOGISTIC and MUL, so they go float together, and the first conv has no op type of its own
GROUPS = {"onnx": ("se_gate", "swish", "first_conv", "classifier"), "tflite": ("swish+se_gate", "classifier")}
TFLITE_OPS = {"swish+se_gate": ["LOGISTIC", "MUL"], "classifier": ["FULLY_CONNECTED"]}


def onnx_nodes(float_path: Path, groups: list[str]) -> list[str]:
    """Names of the float ONNX graph's nodes that make up `groups`."""
    import onnx

    nodes = list(onnx.load(str(float_path)).graph.node)
    producer = {out: n for n in nodes for out in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def after_pool(node, depth: int = 4) -> bool:
        while depth and node is not None:
            if node.op_type in ("GlobalAveragePool", "ReduceMean"):
                return True
            node, depth = producer.get(node.input[0]), depth - 1
        return False

    picked = []
    for n in nodes:
        if n.op_type != "Sigmoid":
            continue
        muls = [m for m in consumers.get(n.output[0], []) if m.op_type == "Mul"]
        swish = [m for m in muls if n.input[0] in m.input]
        if "swish" in groups and swish:
            picked += [n.name] + [m.name for m in swish]
        if "se_gate" in groups and not swish and after_pool(producer.get(n.input[0])):
            picked += [n.name] + [m.name for m in muls]
    convs = [n for n in nodes if n.op_type == "Conv"]
    if "first_conv" in groups and convs:
        picked.append(convs[0].name)
    if "classifier" in groups:
        picked += [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
    return picked


def tflite_ops(groups: list[str]) -> list[str]:
    """Op types the TFLite converter keeps in float for `groups`."""
    return sorted({op for g in groups for op in TFLITE_OPS[g]})
