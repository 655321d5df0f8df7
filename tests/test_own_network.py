"""The user's own MixConv network, named FILE.py:FACTORY or MODULE:FACTORY, through every step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HEARTBEAT, PHOTOS, assert_usage_error

from devices.runners import LiteRtRunner, OrtRunner
from exporters.inspect_file import inspect_file
from mixnet_deploy.parity import reference_outputs
from mixnet_deploy.preprocess import random_images, sample_photos
from test_models import perturbed

# a sibling module it imports, as a user's project would (the file's folder is importable), with the
# project's own MixConv
BLOCKS = '''
import torch
from torch import nn


class MixConv(nn.Module):
    def __init__(self, channels, kernels, stride):
        super().__init__()
        self.splits = [channels // len(kernels)] * len(kernels)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False)
                                   for c, k in zip(self.splits, kernels))

    def forward(self, x):
        return torch.cat([conv(part) for conv, part in zip(self.convs, torch.split(x, self.splits, 1))], 1)


def mix_block(channels, stride):
    return nn.Sequential(MixConv(channels, (3, 5, 7, 9), stride), nn.BatchNorm2d(channels), nn.SiLU())
'''
NET = '''
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from {blocks} import mix_block


@dataclass
class Width:  # a dataclass with postponed annotations: its module must be importable by name
    expanded: int = 48


class TinyMixNet(nn.Module):
    def __init__(self, classes=7):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(24, Width().expanded, 1, bias=False), nn.BatchNorm2d(48), nn.SiLU())
        self.mix = mix_block(48, 2)
        self.project = nn.Sequential(nn.Conv2d(48, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.project(self.mix(self.expand(self.stem(x)))).mean((2, 3)))


def build():
    model = TinyMixNet()
    model.pretrained_cfg = {{"input_size": (3, 96, 96), "crop_pct": 1.0, "interpolation": "bilinear",
                            "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}}
    return model


def broken():
    raise RuntimeError("no such width")


def not_a_module():
    return 3


def feature_map():
    return nn.Conv2d(3, 8, 3)


class Fixed(TinyMixNet):  # a head sized for 80x80 inputs only
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32 * 20 * 20, 7)

    def forward(self, x):
        return self.head(self.project(self.mix(self.expand(self.stem(x)))).flatten(1))


def fixed():
    return Fixed()


def gray():  # one-channel images
    model = nn.Sequential(nn.Conv2d(1, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.ReLU(), mix_block(24, 2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))
    model.pretrained_cfg = {{"input_size": (1, 64, 64), "crop_pct": 1.0, "interpolation": "bilinear",
                            "mean": (0.5,), "std": (0.25,)}}
    return model


def small():  # 28x28 digits, below --input-size's least; a dropout before a BatchNorm of its own momentum
    model = nn.Sequential(nn.Conv2d(1, 24, 3, 1, 1), nn.Dropout2d(0.5), nn.BatchNorm2d(24, momentum=0.01), nn.ReLU(),
                          mix_block(24, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))
    model.pretrained_cfg = {{"input_size": (1, 28, 28), "crop_pct": 1.0, "interpolation": "bilinear",
                            "mean": (0.5,), "std": (0.25,)}}
    return model


def mismatched():
    model = gray()
    model.pretrained_cfg = {{**model.pretrained_cfg, "mean": (0.5, 0.5, 0.5)}}
    return model


def late():  # imports a module of its folder only when called
    from {blocks}_late import WIDTH
    return TinyMixNet(classes=WIDTH)
'''


def write_network(folder, name: str) -> None:
    """NAME.py and its sibling NAME_blocks.py in `folder` (unique names: Python caches imported modules)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}_blocks.py").write_text(BLOCKS)
    (folder / f"{name}_blocks_late.py").write_text("WIDTH = 9\n")
    (folder / f"{name}.py").write_text(NET.format(blocks=f"{name}_blocks"))


@pytest.mark.slow
def test_own_network_file_exports_quantizes_and_benches(tmp_path, monkeypatch, run_cli):
    """FILE.py:FACTORY from another folder: info reads its config, export writes FACTORY.onnx/.tflite
    matching PyTorch, quantize and bench rebuild it from the recorded absolute path, and a changed
    file is refused as a changed checkpoint is."""
    write_network(tmp_path / "project", "tinynet")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    name = "../project/tinynet.py:build"
    info = json.loads(run_cli("info", name, "--json").out)
    assert info["num_classes"] == 7 and info["preprocess"]["input_size"] == [3, 96, 96]
    assert [layer["kernel_sizes"] for layer in info["mixconv_layers"]] == [[3, 5, 7, 9]]
    # at another size than its own: the BatchNorm statistics are calibrated at it, and rebuilt so
    result = run_cli("export", name, "--format", "all", "--calibrate-bn", "--input-size", "80", "--json")
    assert result.code == 0, result.err
    reports = json.loads(result.out)
    assert sorted(os.listdir()) == ["build.onnx", "build.tflite"] and all(r["parity"]["passed"] for r in reports)
    meta = inspect_file("build.onnx")["metadata"]
    assert "BatchNormalization" not in inspect_file("build.onnx")["ops"]  # its MixConv's too is folded
    assert meta["mixdeploy.model"] == f"{tmp_path / 'project' / 'tinynet.py'}:build"
    from mixnet_deploy.models import load_model

    loaded = load_model(name, calibrate_bn=True, input_size=(80, 80))  # the files compute what the network does
    x = torch.cat([random_images(3, (3, 80, 80)), sample_photos(loaded.preprocess)[:3]])
    ref = reference_outputs(loaded.module, x)
    for out in (OrtRunner("build.onnx").run(x.numpy()), LiteRtRunner("build.tflite").run(x.numpy().transpose(0, 2, 3, 1))):
        assert out.shape == (6, 7) and np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    monkeypatch.chdir(tmp_path)
    quantized = run_cli("quantize", "work/build.tflite", "--calib", PHOTOS, "--json")
    assert quantized.code == 0, quantized.err
    assert json.loads(quantized.out)["model"] == meta["mixdeploy.model"]
    bench = run_cli("bench", "work/build.onnx", "work/build_int8.tflite", "--runs", "3", "--json")
    assert bench.code == 0, bench.err
    assert [r["parity"]["passed"] for r in json.loads(bench.out)["results"]] == [True, True]
    # a network that runs at its exported size only is rebuilt at it, from any folder; its 20x20 map
    # flattened into a Linear converts to TFLite too
    fixed = run_cli("export", "project/tinynet.py:fixed", "--input-size", "80", "--format", "all", "-o", "work/fixed")
    assert fixed.code == 0, fixed.err
    monkeypatch.chdir(tmp_path / "project")
    again = run_cli("bench", "../work/fixed.onnx", "../work/fixed.tflite", "--runs", "3", "--json")
    assert again.code == 0 and [r["parity"]["passed"] for r in json.loads(again.out)["results"]] == [True] * 2, again.err
    late = load_model("tinynet.py:late")  # the code recorded is what was loaded once FACTORY ran
    assert late.num_classes == 9 and sorted(Path(f).name for f in late.code) == [
        "tinynet.py", "tinynet_blocks.py", "tinynet_blocks_late.py"]
    # the code it was built from, its sibling module too, is checked before it runs again
    for edited in ("tinynet_blocks.py", "tinynet.py"):
        original = (tmp_path / "project" / edited).read_text()
        (tmp_path / "project" / edited).write_text(original + "\n# edited\n")
        assert_usage_error(run_cli("quantize", "../work/build.onnx", "--calib", PHOTOS), f"{edited} has changed since")
        (tmp_path / "project" / edited).write_text(original)


@pytest.mark.slow
def test_an_own_mixnet_lowers_as_timms():
    """benchmarks/own_mixnet.py (timm's mixnet_s with a split/cat MixConv class of its own): every
    MixConv is recognised, and the lowered model is timm's mixnet_s's, module for module and weight
    for weight."""
    from conftest import ROOT

    from mixnet_deploy.lower import analyse, lower
    from mixnet_deploy.models import load_model
    from mixnet_deploy.planner import make_plan

    own, timm_s = load_model(f"{ROOT / 'benchmarks' / 'own_mixnet.py'}:build"), load_model("mixnet_s")
    size = timm_s.preprocess.input_size
    assert analyse(own.module, size) == analyse(timm_s.module, size)
    lowered = [lower(m.module, size, make_plan("auto", m.module, size, "litert")).module for m in (own, timm_s)]
    assert str(lowered[0]) == str(lowered[1])
    theirs = lowered[1].state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in lowered[0].state_dict().items())


@pytest.mark.slow
def test_own_network_against_the_peers(tmp_path, monkeypatch, run_cli):
    """bench --compare-peers FILE.py:FACTORY: the plain export always, litert-torch and onnx2tf where
    installed, building the network from its file in their own environments."""
    from exporters import peers

    write_network(tmp_path / "project", "peernet")
    monkeypatch.chdir(tmp_path)
    result = run_cli("bench", "--compare-peers", "project/peernet.py:build", "--runs", "3", "--parity-samples", "4",
                     "--keep", "kept", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert set(report["missing_peers"]) == {peer for peer, here in peers.available().items() if not here}, report
    rows = sorted((r["source"], r["format"]) for r in report["results"])
    expected = [("mixdeploy", "onnx"), ("mixdeploy", "tflite"), ("plain torch.onnx.export", "onnx")] + [
        (peer, "tflite") for peer, here in peers.available().items() if here]
    assert rows == sorted(expected) and all(r["parity"]["passed"] for r in report["results"]), report["results"]
    assert sorted(p.name for p in (tmp_path / "kept" / "ours").iterdir()) == ["build.onnx", "build.tflite"]


def test_the_litert_torch_peer_builds_own_networks(tmp_path, monkeypatch):
    """exporters/peer_litert_torch.py (run in litert-torch's environment, which CI does not make)
    builds FILE.py:FACTORY (its sibling module and dataclass importable), MODULE:FACTORY from the
    current folder, a timm model of its weights' classes, and a MixConv drop-in (built by mixdeploy's dropin)."""
    from exporters.peer_litert_torch import build

    write_network(tmp_path, "peerbuilt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # build() extends it, as its own process may
    for spec in (f"{tmp_path / 'peerbuilt.py'}:build", "peerbuilt:build"):
        model = build(spec, {})
        assert type(model).__name__ == "TinyMixNet" and model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert build("mixnet_s", {"classifier.weight": torch.zeros(9, 1536)}).num_classes == 9
    dropin = build("mixconv_mobilenetv2_100", {"classifier.weight": torch.zeros(5, 1280)})  # mixdeploy's own
    assert dropin.num_classes == 5 and sum(type(m).__name__ == "MixConv" for m in dropin.modules()) == 17


@pytest.mark.slow
def test_own_grayscale_network(tmp_path, monkeypatch, run_cli):
    """A one-channel network: photos are read as grayscale for its parity checks and calibration."""
    write_network(tmp_path, "graynet")
    monkeypatch.chdir(tmp_path)
    exported = run_cli("export", "graynet.py:gray", "--format", "all", "--json")
    assert exported.code == 0, exported.err
    assert [r["parity"]["passed"] for r in json.loads(exported.out)] == [True, True]
    from mixnet_deploy.models import load_model

    loaded = load_model("graynet.py:gray")
    photos = sample_photos(loaded.preprocess)
    assert photos.shape[1:] == (1, 64, 64)
    ref = reference_outputs(loaded.module, photos)
    out = LiteRtRunner("gray.tflite").run(photos.numpy().transpose(0, 2, 3, 1))
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    quantized = run_cli("quantize", "gray.tflite", "--calib", PHOTOS, "--json")
    assert quantized.code == 0 and json.loads(quantized.out)["agreement"]["passed"], quantized.err
    layers = [r["layer"] for r in json.loads(quantized.out)["layers_losing_most"]]  # modules, and the logits
    assert "output" in layers and not [name for name in layers if set(name) & set("/:;")], layers
    assert inspect_file("gray_int8.tflite")["inputs"][0]["shape"] == [1, 64, 64, 1]


@pytest.mark.slow
def test_own_small_network_calibrated_as_it_runs(tmp_path, monkeypatch, run_cli):
    """A 28x28 network (its pretrained_cfg's size, which --input-size would refuse) exports with its
    BatchNorm calibrated as the network runs deployed (dropout off, the same statistics every time, its
    own momentum kept), and quantize rebuilds it from the file at that size."""
    write_network(tmp_path, "smallnet")
    monkeypatch.chdir(tmp_path)
    from mixnet_deploy.models import load_model

    stats = []
    for seed in (0, 1):  # dropout in training mode would draw from torch's generator
        torch.manual_seed(seed)
        bn = load_model("smallnet.py:small", calibrate_bn=True).module[2]
        stats.append(torch.cat([bn.running_mean, bn.running_var]))
    assert torch.equal(*stats) and bn.momentum == 0.01 and not bn.training
    exported = run_cli("export", "smallnet.py:small", "--format", "onnx", "--calibrate-bn", "--json")
    assert exported.code == 0 and json.loads(exported.out)[0]["parity"]["passed"], exported.err
    quantized = run_cli("quantize", "small.onnx", "--calib", PHOTOS, "--json")
    assert quantized.code == 0 and json.loads(quantized.out)["agreement"]["passed"], quantized.err
    assert inspect_file("small_int8.onnx")["inputs"][0]["shape"] == [1, 1, 28, 28]


def test_own_network_module_with_a_checkpoint(tmp_path, monkeypatch, run_cli):
    """MODULE:FACTORY from the current folder, with trained weights: the checkpoint is what is exported."""
    write_network(tmp_path, "modnet")
    monkeypatch.chdir(tmp_path)
    from mixnet_deploy.models import load_model

    source = load_model("modnet:build").module
    state = perturbed(source.state_dict())
    torch.save(state, "w.pth")
    loaded = load_model("modnet:build", checkpoint="w.pth")
    assert loaded.name == "modnet:build" and loaded.labels is None and loaded.num_classes == 7
    assert all(torch.equal(loaded.module.state_dict()[k], v) for k, v in state.items())
    result = run_cli("export", "modnet:build", "--checkpoint", "w.pth", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)[0]["path"] == "build.onnx" and json.loads(result.out)[0]["parity"]["passed"]
    # rebuilt elsewhere, where `modnet` is another module (here: this process's, from the first folder)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "modnet.py").write_text("def build():\n    raise SystemExit('not this one')\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert_usage_error(run_cli("bench", "../build.onnx", "--runs", "1"), "did not load", "modnet.py")
    monkeypatch.chdir(tmp_path)
    # the installed command, in a fresh process: the current folder importable, and TensorFlow's
    # import-time log lines (printed on its first import) kept off stderr
    done = subprocess.run([Path(sys.executable).with_name("mixdeploy"), "export", "modnet:build", "--checkpoint", "w.pth",
                           "--format", "tflite"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and Path("build.tflite").is_file(), done.stderr
    assert [line for line in done.stderr.splitlines() if not HEARTBEAT.match(line)] == []


def test_own_network_mistakes_are_one_line(tmp_path, monkeypatch, run_cli):
    write_network(tmp_path, "badnet")
    (tmp_path / "syntax.py").write_text("def build(:\n")
    monkeypatch.chdir(tmp_path)
    assert_usage_error(run_cli("info", "nope.py:build"), "nope.py does not exist")
    assert_usage_error(run_cli("info", "badnet.py:missing"), "badnet.py has no function missing")
    assert_usage_error(run_cli("info", "badnet.py:broken"), "badnet.py:broken() failed: RuntimeError: no such width")
    assert_usage_error(run_cli("info", "badnet.py:not_a_module"), "returned int, not a torch.nn.Module")
    assert_usage_error(run_cli("info", "badnet.py:feature_map"), "returns (2, 8, 222, 222)", "(batch, classes)")
    assert_usage_error(run_cli("info", "syntax.py:build"), "syntax.py failed: SyntaxError")
    assert_usage_error(run_cli("info", "badnet.py:mismatched"), "with mean (0.5, 0.5, 0.5) and std (0.25,)",
                       "1 (grayscale) or 3 (RGB) channels")
    assert_usage_error(run_cli("info", "no_such_module:build"), "no module no_such_module here")
    assert_usage_error(run_cli("info", "devices:build"), "devices is one of mixdeploy's own modules")
    installed = json.loads(run_cli("info", "torchvision.models:mobilenet_v2", "--json").out)  # an installed package's
    assert installed["num_classes"] == 1000 and installed["mixconv_layers"] == []
    assert_usage_error(run_cli("bench", "mixconv_mobilenetv2_100.onnx"), "does not exist")
    assert_usage_error(run_cli("bench", "badnet.py:build"), "badnet.py:build is a model name",
                       "--compare-peers badnet.py:build")
    assert_usage_error(run_cli("export", "badnet.py:build", "--pretrained"), "--pretrained is for timm's models")
    assert not [f for f in os.listdir() if not f.endswith(".py") and f != "__pycache__"]  # nothing written
