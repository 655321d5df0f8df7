import json

import numpy as np
import pytest
import torch
from conftest import SWEEP_SIZE, SWEPT, assert_usage_error, randomize_batchnorm
from test_export_onnx import assert_float32_bound, check_export
from test_lowering import LAYERS, block, expansion_block, relu_after_split_mixconvs

from devices.runners import LiteRtRunner
from exporters.export import export
from exporters.tflite_export import write_tflite
from exporters.tflite_inspect import delegation, read_metadata
from mixnet_deploy import MixConv, load_model
from mixnet_deploy.lower import analyse, lower
from mixnet_deploy.parity import compare
from mixnet_deploy.plan import Plan

pytestmark = pytest.mark.slow


def depthwise_taps(path) -> list[int]:
    """Kernel height x width of every DEPTHWISE_CONV_2D (its filter is 1 x H x W x C)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    return [int(np.prod(tensors[op["inputs"][1]]["shape"][1:3])) for op in interp._get_ops_details()
            if op["op_name"] == "DEPTHWISE_CONV_2D"]


@pytest.mark.parametrize("first", [1, 3])  # fed by a 1x1 conv it takes its rows; by a 3x3 it stays whole
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_every_choice_converts_with_parity(tmp_path, layer, first):
    torch.manual_seed(0)
    mix = LAYERS[layer]()
    channels = sum(mix.splits)
    model = block(mix, channels, first)
    info, = analyse(model, (channels, 19, 21))
    x = torch.randn(3, channels, 19, 21)
    with torch.no_grad():
        ref = model(x).numpy()
    # every lowering side by side in one graph: one conversion instead of one per choice
    every = Every([lower(model, (channels, 19, 21), Plan({"1": choice})).module for choice in info.candidates])
    write_tflite(every, (channels, 19, 21), tmp_path / "m.tflite")
    outs = LiteRtRunner(tmp_path / "m.tflite").run(x.numpy().transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    for choice, out in zip(info.candidates, np.split(outs, len(info.candidates), axis=1), strict=True):
        assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), choice
    assert not delegation(tmp_path / "m.tflite")["not_delegated"]


class Every(torch.nn.Module):
    """Modules applied to one input, their outputs concatenated along channels."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], 1)


def test_tensors_are_named_after_their_modules(tmp_path):
    """Each tensor's scope is its PyTorch module (what quantize's SQNR report names): a module whose
    ops run in two places (SE's mean and gate multiply) or that is called twice keeps one scope, and a
    module name TF refuses as a scope (leading underscore) is cleaned, not fatal."""
    from ai_edge_litert.interpreter import Interpreter
    from timm.layers import SqueezeExcite

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.se, self._odd, self.shared = SqueezeExcite(8), torch.nn.Conv2d(8, 8, 1), SqueezeExcite(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.shared(self.shared(self._odd(self.se(x))))

    torch.manual_seed(0)
    model = Net().eval()
    write_tflite(lower(model, (8, 6, 6), Plan({})).module, (8, 6, 6), tmp_path / "n.tflite")
    scopes = {d["name"].split(";")[0].rpartition("/")[0] for d in Interpreter(str(tmp_path / "n.tflite")).get_tensor_details()}
    assert {"se", "se.fc1", "odd", "shared", "shared.gate"} <= scopes, scopes
    assert not [s for s in scopes if s.endswith("_1")], scopes
    x = torch.randn(2, 8, 6, 6)
    out = LiteRtRunner(tmp_path / "n.tflite").run(x.numpy().transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_pairs_read_the_input_itself(tmp_path):
    """+pairs pieces are centred like their kernel: TF's SAME padding, no PAD and no STRIDED_SLICE."""
    model = block(MixConv(64, (3, 5, 7, 9)), 64)
    lowered = lower(model, (64, 14, 14), Plan({"1": "split+pairs"}))
    write_tflite(lowered.module, (64, 14, 14), tmp_path / "p.tflite")
    ops = delegation(tmp_path / "p.tflite")["ops"]
    assert "PAD" not in ops and "STRIDED_SLICE" not in ops, ops
    assert ops["DEPTHWISE_CONV_2D"] == 1 + 1 + 3 + 5  # 3x3, 5x5, 7x7 as 3 pieces, 9x9 as 5
    assert max(depthwise_taps(tmp_path / "p.tflite")) <= 25


def test_the_expanded_tensor_is_never_split(tmp_path):
    """Each depthwise group is fed by its own rows of the expansion conv: the only SPLIT left is of
    the narrow block input, where grouped expansion rows read different input channels."""
    x = torch.randn(2, 24, 12, 12)
    for groups, splits in ((1, 0), (2, 1)):
        model = expansion_block(groups, (3, 5, 7, 9) if groups == 2 else (3, 5, 7))
        lowered = lower(model, (24, 12, 12), Plan({"dw": "split"}))
        write_tflite(lowered.module, (24, 12, 12), tmp_path / "e.tflite")
        ops = delegation(tmp_path / "e.tflite")["ops"]
        assert ops.get("SPLIT", 0) == splits and ops["CONV_2D"] == len(lowered.module.pw.expands), ops
        with torch.no_grad():
            ref = model(x).numpy()
        out = LiteRtRunner(tmp_path / "e.tflite").run(x.numpy().transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_a_relu_after_a_split_mixconv_is_fused_into_its_segments(tmp_path):
    """The lowering moved the ReLU into each segment (test_lowering): each segment's last op takes it
    as its fused activation, so no RELU op is left, fp32 or int8 (XNNPACK leaves out an int8 RELU
    after a CONCATENATION)."""
    from quantization.tflite_int8 import quantize_tflite

    x = torch.randn(8, 24, 12, 12)
    for model, lowered in relu_after_split_mixconvs():
        write_tflite(lowered, (24, 12, 12), tmp_path / "r.tflite")
        ops = delegation(tmp_path / "r.tflite")["ops"]
        assert "RELU" not in ops and "RELU6" not in ops and "CONCATENATION" in ops
        with torch.no_grad():
            ref = model(x).numpy()
        out = LiteRtRunner(tmp_path / "r.tflite").run(x.numpy().transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
        quantize_tflite(lowered, (24, 12, 12), tmp_path / "q.tflite", x.numpy())
        int8 = delegation(tmp_path / "q.tflite")
        assert not {"RELU", "RELU6"} & set(int8["ops"]) and int8["not_delegated"] == {} and int8["partitions"] == 1, int8


def check_conversion(result) -> None:
    assert result.passed
    assert_float32_bound(result)
    assert result.details["delegated"] == result.details["nodes"]
    assert "TRANSPOSE" not in result.ops and "SPLIT_V" not in result.ops


@pytest.mark.parametrize("name", SWEPT)
def test_every_model_exports_and_converts_with_parity(tmp_path, name):
    """Both formats from one model build and reference; BatchNorm statistics calibrated on the photos, so
    folding them into the convs is exercised on every model (random-init ones are the identity)."""
    onnx_file, tflite_file = export(name, "all", tmp_path / name, input_size=SWEEP_SIZE, calibrate_bn=True)
    check_export(onnx_file, tmp_path / f"{name}.onnx")
    assert onnx_file.details["inputs"][0]["shape"] == [1, 3, *SWEEP_SIZE]
    check_conversion(tflite_file)
    assert tflite_file.details["inputs"][0]["shape"] == [1, *SWEEP_SIZE, 3]
    if name not in ("mixnet_xl", "mixnet_xxl"):  # the deep ones reach 1.1e-5 here; these 2.6-5.7e-6 (2026-12-02, AMD)
        assert onnx_file.details["torch_float32_rel_max"] < 2e-5 and onnx_file.parity.tolerance["max_rel"] < 4e-5


def test_mixnet_s_auto_plan_is_all_xnnpack_and_avoids_slow_kernels(tmp_path):
    result, = export("mixnet_s", "tflite", tmp_path / "s.tflite", plan="auto")
    check_conversion(result)
    assert result.parity.tolerance == {"max_rel": 1e-5}  # mixnet_s's own float32 run is far below it
    details = result.details
    assert details["partitions"] == 1 and details["not_delegated"] == {}
    assert max(depthwise_taps(result.path)) <= 25  # XNNPACK's fast kernels stop at 25 taps
    assert details["inputs"][0]["shape"] == [1, 224, 224, 3] and details["inputs"][0]["name"] == "input"
    assert details["outputs"][0]["name"] == "logits"
    meta = read_metadata(result.path)
    assert meta["mixdeploy.plan"]["target"] == "litert" and meta["mixdeploy.parity"]["passed"]
    assert len(meta["mixdeploy.labels"]) == 1000 and meta["mixdeploy.preprocess"]["crop_pct"] == 0.875
    split = export("mixnet_s", "tflite", tmp_path / "split.tflite", plan="split")[0]
    assert max(depthwise_taps(split.path)) == 121  # the slow kernels the auto plan avoids


def test_nchw_input_adds_one_transpose(tmp_path):
    result, = export("mixnet_s", "tflite", tmp_path / "n.tflite", input_size=SWEEP_SIZE, options={"input_layout": "nchw"})
    assert result.passed and result.ops["TRANSPOSE"] == 1
    assert result.details["inputs"][0]["shape"] == [1, 3, *SWEEP_SIZE]


def test_fp16_weights_keep_agreement_on_photos(tmp_path, run_cli):
    result, = export("mixnet_s", "tflite", tmp_path / "h.tflite", options={"fp16": True})
    assert result.passed and result.parity.top1_agreement >= 0.99 and result.parity.cosine >= 0.9999
    assert "torch_float32_rel_max" not in result.details  # no float32 bound: PyTorch's float32 run is not made
    float32_bytes = 4 * sum(p.numel() for p in load_model("mixnet_s").module.parameters())
    assert result.size_bytes < 0.6 * float32_bytes  # float16 weights: about half
    assert json.loads(run_cli("info", tmp_path / "h.tflite", "--json").out)["precision"] == "fp16"
    bench = run_cli("bench", tmp_path / "h.tflite", "--runs", "3", "--json")  # judged by fp16's own tolerance
    assert bench.code == 0, bench.err
    parity = json.loads(bench.out)["results"][0]["parity"]
    assert parity["tolerance"] == {"min_cosine": 0.999} and parity["passed"]


def test_all_formats_and_info_of_files(tmp_path, run_cli):
    result = run_cli("export", "tf_mixnet_s", "--format", "all", "--input-size", "96", "-o", tmp_path / "both", "--json")
    assert result.code == 0, result.err
    reports = json.loads(result.out)
    assert [r["format"] for r in reports] == ["onnx", "tflite"] and all(r["passed"] for r in reports)
    for suffix in (".onnx", ".tflite"):
        info = run_cli("info", tmp_path / f"both{suffix}", "--json")
        assert info.code == 0, info.err
        report = json.loads(info.out)
        assert report["metadata"]["mixdeploy.model"] == "tf_mixnet_s" and report["ops"] and report["precision"] == "fp32"
        converters = {"onnx", "onnxruntime"} if suffix == ".onnx" else {"tensorflow", "ai_edge_litert"}
        assert set(report["metadata"]["mixdeploy.versions"]) == {"mixdeploy", "torch", "timm", *converters}
    text = run_cli("info", tmp_path / "both.tflite")
    assert "XNNPACK takes" in text.out and "PASS" in text.out and "tflite fp32" in text.out
    assert "plan (auto, litert): " in text.out and "crop_pct" in text.out and "tensorflow 2." in text.out
    assert_usage_error(run_cli("export", "tf_mixnet_s", "--format", "tflite", "-o", tmp_path / "both.tflite"), "--force")
    (tmp_path / "junk.tflite").write_bytes(b"not a flatbuffer")
    assert_usage_error(run_cli("info", tmp_path / "junk.tflite"), "not a readable TFLite file")


def converts_exactly(model: torch.nn.Module, lowered: torch.nn.Module, size: tuple[int, int, int], path) -> dict:
    """`lowered` written to `path` computes what `model` does on random inputs; its XNNPACK delegation."""
    write_tflite(lowered, size, path)
    x = torch.randn(3, *size)
    with torch.no_grad():
        ref = model(x).numpy()
    out = LiteRtRunner(path).run(x.numpy().transpose(0, 2, 3, 1))
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    return delegation(path)


def test_other_activations_convert_and_run_in_xnnpack(tmp_path):
    """Hard-swish, hard-sigmoid, GELU (exact and tanh), tanh, as modules and functions, and timm's
    Linear (the own networks and timm drop-ins use them) match PyTorch with every op in XNNPACK; a
    layer the writer cannot translate is named in one line."""
    import torch.nn.functional as F
    from timm.layers import Linear
    from torch import nn

    from mixnet_deploy.errors import MixdeployError
    from mixnet_deploy.planner import make_plan

    class Acts(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Hardswish(), MixConv(16, (3, 5)), nn.GELU(),
                                   nn.Conv2d(16, 16, 1), nn.Tanh())
            self.gate = nn.Sequential(nn.Conv2d(16, 16, 1), nn.Hardsigmoid())
            self.fc = Linear(16, 5)  # timm's subclass (MobileNetV3/V4 heads) is one piece too

        def forward(self, x):
            x = self.a(x)
            x = F.silu(x) * self.gate(x.mean((2, 3), keepdim=True))
            x = F.relu6(F.hardswish(x)) + F.gelu(x, approximate="tanh") + torch.tanh(x)
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model, size = Acts().eval(), (8, 12, 12)
    taken = converts_exactly(model, lower(model, size, make_plan("auto", model, size, "litert")).module, size,
                             tmp_path / "a.tflite")
    assert taken["not_delegated"] == {} and {"HARD_SWISH", "GELU", "TANH"} <= set(taken["ops"])
    # int8: XNNPACK takes no int8 HARD_SWISH (the graph split around each), so hard-swish is written as ADD and MULs
    from quantization.tflite_int8 import quantize_tflite

    lowered = lower(model, size, make_plan("auto", model, size, "litert_int8")).module
    calib, fresh = (np.random.default_rng(seed).standard_normal((n, *size)).astype(np.float32) for seed, n in ((0, 32), (1, 8)))
    quantize_tflite(lowered, size, tmp_path / "q.tflite", calib)
    int8 = delegation(tmp_path / "q.tflite")
    assert "HARD_SWISH" not in int8["ops"] and "HARD_SWISH" not in int8["not_delegated"]
    with torch.no_grad():
        reference = model(torch.from_numpy(fresh)).numpy()
    assert compare(reference, LiteRtRunner(tmp_path / "q.tflite").run(fresh.transpose(0, 2, 3, 1)), min_cosine=0.97).passed

    class Shuffled(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.PixelShuffle(2)

        def forward(self, x):
            return self.up(x).mean((2, 3))

    with pytest.raises(MixdeployError, match=r"^up: the TFLite writer cannot translate PixelShuffle; export --format onnx"):
        write_tflite(Shuffled().eval(), size, tmp_path / "p.tflite")
    assert not (tmp_path / "p.tflite").exists()

    class Cosine(nn.Linear):  # a head computing something else than nn.Linear: traced, and named
        def forward(self, x):
            return F.linear(x, self.weight * 2.0)

    class CosineNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = Cosine(8, 3)

        def forward(self, x):
            return self.head(x.mean((2, 3)))

    with pytest.raises(MixdeployError, match=r"^head.weight: the TFLite writer cannot translate a parameter"):
        write_tflite(CosineNet().eval(), (8, 4, 4), tmp_path / "c.tflite")


def test_int8_average_pooling_is_a_depthwise_conv_in_xnnpack(tmp_path):
    """XNNPACK takes no int8 AVERAGE_POOL_2D: for int8 the writer makes each average pooling a depthwise
    conv of 1/k^2 weights (SAME windows scaled by how many of their pixels are inside), exact in float."""
    from torch import nn

    import exporters.tflite_export as writer
    from quantization.tflite_int8 import quantize_tflite

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2, 2), nn.Conv2d(32, 16, 1),
                          nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.AvgPool2d(3, 2, 1, count_include_pad=False),
                          nn.AvgPool2d(3, 2, 1)).eval()
    size = (3, 31, 31)  # 15x15 after the first pooling: SAME windows of stride 2 at both edges
    lowered = lower(model, size, Plan({})).module
    calib, fresh = (torch.randn(n, *size) for n in (32, 8))
    with torch.no_grad():
        reference = model(fresh).numpy()
    for_int8 = writer._FOR_INT8.set(True)
    try:  # the int8 form, computed in float by TensorFlow: the same numbers
        forward = writer.to_tf_function(lowered, size)
        out = np.concatenate([forward(image[None])[writer.OUTPUT_NAME].numpy() for image in fresh.numpy().transpose(0, 2, 3, 1)])
    finally:
        writer._FOR_INT8.reset(for_int8)
    assert np.abs(out.transpose(0, 3, 1, 2) - reference).max() <= 1e-5 * np.abs(reference).max()
    quantize_tflite(lowered, size, tmp_path / "q.tflite", calib.numpy())
    int8 = delegation(tmp_path / "q.tflite")
    assert "AVERAGE_POOL_2D" not in int8["ops"] and int8["not_delegated"] == {} and int8["partitions"] == 1, int8
    quantized = LiteRtRunner(tmp_path / "q.tflite").run(fresh.numpy().transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert compare(reference, quantized, min_cosine=0.99).passed
    write_tflite(lowered, size, tmp_path / "f.tflite")  # float keeps AVERAGE_POOL_2D, which XNNPACK takes there
    assert delegation(tmp_path / "f.tflite")["ops"]["AVERAGE_POOL_2D"] == 4


class OwnLayers(torch.nn.Module):
    """What users' own networks are made of besides MixNet's layers: their own MixConv (split, convs,
    cat), max and average pooling with PyTorch's padding and TF's, BatchNorms no conv precedes (timm's
    with its activation too), leaky ReLU, ELU, PReLU, dropout, softmax, chunk, slices, cat, arithmetic, adaptive pooling, and a
    5x5 map flattened with view into a Linear."""

    def __init__(self):
        from test_lowering import SplitCat
        from timm.layers import BatchNormAct2d
        from torch import nn

        super().__init__()
        self.stem, self.mix = nn.Conv2d(8, 16, 3, 1, 1), SplitCat(16, (3, 5, 7, 9))
        self.bn_mix, self.act = nn.BatchNorm2d(16), nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(3, 2, 1)  # padding (1, 1), where TF's SAME pads (0, 1) at 20 px
        self.avg, self.bn = nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(16)
        self.bn_act = BatchNormAct2d(16, act_layer=nn.SiLU)  # timm's, after an add: not folded either
        self.prelu, self.elu, self.drop = nn.PReLU(16), nn.ELU(0.7), nn.Dropout2d()
        nn.init.uniform_(self.prelu.weight, -0.5, 0.5)  # a slope per channel
        self.fc = nn.Linear(16 * 5 * 5, 5)

    def forward(self, x):
        import torch.nn.functional as F

        x = self.pool(self.act(self.bn_mix(self.mix(self.stem(x)))))  # 10 x 10
        x = self.bn(self.avg(x) + F.max_pool2d(x, 3, 1, 1))  # the second pads as TF's SAME does
        x = self.bn_act(x + 0.5)
        top, bottom = torch.split(x, 5, dim=2)  # along rows, then columns
        x = torch.cat(tensors=[bottom, top], dim=2)
        x = torch.cat([x[:, :, :, 6:], x[:, :, :, :6]], dim=-1)
        a, b = x.chunk(chunks=2, dim=1)
        x = torch.cat([F.leaky_relu(a, 0.2), self.elu(b[:, :x.size(1) // 4]), F.elu(x[:, 12:])], 1)
        x = F.avg_pool2d(self.drop(self.prelu(x * F.relu6(x + 3) / 6 - 0.5)), 2)  # 5 x 5
        logits = self.fc(F.dropout(x.view(x.size(dim=0), -1), 0.2, self.training))
        pooled = F.adaptive_avg_pool2d(x[:, :5], [1, 1]).flatten(1)  # its size as a list
        return F.softmax(logits + x[:, 3].mean((1, 2)).reshape(-1, 1) + pooled, dim=1)  # an int index on channels


class Lambda(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


def test_layers_of_own_networks_convert_exactly_into_xnnpack(tmp_path):
    from test_lowering import SplitCat

    from mixnet_deploy.errors import MixdeployError
    from mixnet_deploy.planner import make_plan

    torch.manual_seed(0)
    model, size = randomize_batchnorm(OwnLayers().eval()), (8, 20, 20)
    lowered = lower(model, size, make_plan("auto", model, size, "litert")).module
    assert not isinstance(lowered.mix, SplitCat) and not isinstance(lowered.bn_mix, torch.nn.BatchNorm2d)  # folded
    taken = converts_exactly(model, lowered, size, tmp_path / "own.tflite")
    assert taken["not_delegated"] == {} and {"MAX_POOL_2D", "AVERAGE_POOL_2D", "LEAKY_RELU", "ELU", "SOFTMAX"} <= set(
        taken["ops"])
    assert "TRANSPOSE" not in taken["ops"]  # the flatten reorders the Linear's weight, not the map

    class Spread(torch.nn.Module):  # a flattened map read by something else than a Linear: its order would show
        def forward(self, x):
            return torch.flatten(x, 1) * 2.0

    with pytest.raises(MixdeployError, match=r"flatten: the TFLite writer flattens a feature map larger than 1x1 only "
                                             r"into a Linear; export --format onnx"):
        write_tflite(Spread().eval(), size, tmp_path / "s.tflite")
    import torch.nn.functional as F

    for refused, message in [(lambda x: x[:, :, 0].mean(-1), "int index of a feature map on its channel axis only"),
                             (lambda x: torch.flatten(x, 2).mean(-1), r"into \(batch, features\) only"),
                             (lambda x: torch.sub(x, x, alpha=2).mean((2, 3)), r"cannot translate sub\(\)"),
                             (lambda x: x.mean(3).mean(2), "over rows or columns alone only with keepdim=True"),
                             (lambda x: (x * x[:, 0]).mean((2, 3)), "combines a feature map only with another"),
                             (lambda x: F.dropout(x, 0.1).mean((2, 3)), r"dropout\(training=True\) drops at random")]:
        with pytest.raises(MixdeployError, match=message):
            write_tflite(torch.fx.symbolic_trace(Lambda(refused)), size, tmp_path / "s.tflite")

    class Gated(torch.nn.Module):  # control flow on values: torch.fx cannot follow it
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.gate(x).mean((2, 3)) if x.mean() > 0 else x.mean((2, 3))

    with pytest.raises(MixdeployError, match=r"^the model \(Gated\): torch.fx cannot follow its forward\(\): "
                                             r"symbolically traced variables cannot be used as inputs to control flow; "
                                             r"the TFLite writer needs one it can follow: export --format onnx"):
        write_tflite(Gated().eval(), size, tmp_path / "g.tflite")
    assert not list(tmp_path.glob("[sg].tflite"))


def test_a_retag_replaces_the_metadata_buffer(tmp_path):
    """Tagging a file again replaces its metadata in place: no orphaned buffer grows the file."""
    from exporters.tflite_inspect import _model, write_metadata

    path = tmp_path / "m.tflite"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    write_tflite(lower(model, (3, 8, 8), Plan({})).module, (3, 8, 8), path)
    x = np.random.default_rng().standard_normal((2, 8, 8, 3), dtype=np.float32)
    before = LiteRtRunner(path).run(x)
    write_metadata(path, {"tag": "first " * 100})
    buffers, size = len(_model(path)[1].buffers), path.stat().st_size
    write_metadata(path, {"tag": "second " * 100}, "logits")
    assert read_metadata(path) == {"tag": "second " * 100}
    assert len(_model(path)[1].buffers) == buffers and path.stat().st_size <= size + 100
    np.testing.assert_array_equal(LiteRtRunner(path).run(x), before)
