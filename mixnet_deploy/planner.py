"""Turning a --plan argument into a plan for a model and a target runtime."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .cost_model import CostModel
from .errors import MixdeployError
from .lower import (
    analyse,
    check_plan,
    default_choice,
    discover,
    layer_info,
    preset_plan,
    signatures,
)
from .plan import Plan

TARGETS = ("onnxruntime", "litert", "onnxruntime_int8", "litert_int8")


def auto_plan(model: nn.Module, input_size: tuple[int, int, int], target: str) -> Plan:
    """The plan the measured cost model of `target` predicts to be fastest, layer by layer (an int8
    target without a table of its own falls back to its float table)."""
    if target.endswith("_int8") and not CostModel.exists(target):
        target = target.removesuffix("_int8")
    costs = CostModel.load(target)
    plan = Plan(target=target, source="auto")
    for site in discover(model, input_size):
        info = layer_info(site)
        if info is not None:
            choice, estimates = costs.choose(site, info)
            plan.layers[site.name] = choice
            plan.estimates_ms[site.name] = round(estimates[choice], 4)
            plan.shapes.update(signatures([info]))
    return plan


def make_plan(spec: str, model: nn.Module, input_size: tuple[int, int, int], target: str) -> Plan:
    """spec: auto (cost model of `target`), split, fold, or the path of a plan JSON file."""
    if target not in TARGETS:
        raise MixdeployError(f"unknown target {target!r}; use {', '.join(TARGETS)}")
    if spec == "auto":
        return auto_plan(model, input_size, target)
    if spec in ("split", "fold"):
        return preset_plan(analyse(model, input_size), spec, target)
    plan, layers = read_spec(spec), analyse(model, input_size)
    check_plan(plan, layers)
    # the file's own target, source and estimates were made for another export: this one records
    # what it lowers (every layer, those the file leaves out by default) and where the plan came from
    return Plan({layer.name: plan.layers.get(layer.name, default_choice(layer)) for layer in layers}, target, "file",
                shapes=signatures(layers))


def read_spec(spec: str) -> Plan | None:
    """None for auto, split and fold; the plan in the JSON file `spec` names; else MixdeployError
    (no model needed: commands check --plan before loading one)."""
    if spec in ("auto", "split", "fold"):
        return None
    if not Path(spec).is_file():
        if spec.endswith(".json") or "/" in spec:
            raise MixdeployError(f"plan file {spec} does not exist; pass auto, split, fold or a plan JSON file")
        raise MixdeployError(f"--plan {spec!r} is neither auto, split, fold nor a plan JSON file")
    return Plan.load(spec)
