import pytest
import torch

from mixnet_deploy import count, load_model
from mixnet_deploy.complexity import mixconv_groups
from mixnet_deploy.models import MIXNETS

# MixNet paper, Table 2: params, multiply-adds at 224 x 224
PAPER = {"mixnet_s": (4.1e6, 256e6), "mixnet_m": (5.0e6, 360e6), "mixnet_l": (7.3e6, 565e6)}
# what mixdeploy counts (the README's table): params, MACs, conv and linear MACs, in millions
COUNTED = {"mixnet_s": (4.13, 251.0, 239.2), "mixnet_m": (5.01, 354.7, 339.2), "mixnet_l": (7.33, 575.8, 555.3)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_counted_figures_match_paper_table_2(name):
    loaded = load_model(name)
    stats = count(loaded.module, loaded.preprocess.input_size)
    params, macs = PAPER[name]
    assert abs(stats.params - params) / params < 0.02, stats.params
    assert abs(stats.macs - macs) / macs < 0.02, stats.macs
    counted = (round(stats.params / 1e6, 2), round(stats.macs / 1e6, 1), round(stats.conv_macs / 1e6, 1))
    assert counted == COUNTED[name]
    # conv and linear multiply-adds counted here from each layer's output, independently of mixdeploy
    layer_macs = []

    def hook(module, _inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            layer_macs.append(output.numel() * module.in_channels // module.groups * kh * kw)
        elif isinstance(module, torch.nn.Linear):
            layer_macs.append(output.numel() * module.in_features)

    for module in loaded.module.modules():
        module.register_forward_hook(hook)
    with torch.no_grad():
        loaded.module(torch.randn(1, *loaded.preprocess.input_size))
    assert sum(layer_macs) == stats.conv_macs
    assert stats.params == sum(p.numel() for p in loaded.module.parameters())
    assert any(layer.kind == "depthwise" and len(layer.kernel_sizes) >= 3 for layer in stats.mixconv_layers)


@pytest.mark.parametrize("name", MIXNETS)
def test_every_named_mixnet_builds_and_runs(name):
    loaded = load_model(name)
    assert loaded.random_init and not loaded.module.training
    assert loaded.preprocess.input_size[0] == 3 and loaded.labels and len(loaded.labels) == 1000
    with torch.no_grad():
        y = loaded.module(torch.randn(1, *loaded.preprocess.input_size))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


def test_preprocessing_is_timms_resolved_config(tmp_path):
    """Every field is what timm's resolve_data_config gives the model, not a default: an own network
    whose pretrained_cfg differs from ImageNet's in every field, and timm's MixNets."""
    from timm.data import resolve_data_config

    (tmp_path / "odd.py").write_text(
        "from torch import nn\n\n\ndef build():\n    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), "
        "nn.Flatten())\n    net.pretrained_cfg = {'input_size': (3, 200, 180), 'interpolation': 'bilinear', "
        "'crop_pct': 0.95, 'crop_mode': 'squash', 'mean': (0.5, 0.4, 0.3), 'std': (0.2, 0.25, 0.3)}\n"
        "    return net\n")
    odd = load_model(f"{tmp_path}/odd.py:build").preprocess
    assert (odd.input_size, odd.interpolation, odd.crop_pct, odd.crop_mode, odd.mean, odd.std) == (
        (3, 200, 180), "bilinear", 0.95, "squash", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    for name in ("mixnet_s", "tf_mixnet_s", "mixnet_xl"):
        loaded = load_model(name)
        timm_cfg = resolve_data_config({}, model=loaded.module)
        assert {k: getattr(loaded.preprocess, k) for k in timm_cfg} == {
            k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in timm_cfg.items()}, name


def test_mobilenetv2_dropin_replaces_every_depthwise_conv():
    loaded = load_model("mixconv_mobilenetv2_100")
    depthwise = [m for m in loaded.module.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    mixconvs = [m for m in loaded.module.modules() if mixconv_groups(m) is not None]
    assert len(mixconvs) == 17  # MobileNetV2 has 17 depthwise convs
    import timm

    original = [m for m in timm.create_model("mobilenetv2_100").modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert [(sum(g.in_channels for g in mixconv_groups(m)), mixconv_groups(m)[0].stride) for m in mixconvs] == [
        (c.in_channels, c.stride) for c in original]  # each in its place: channels and stride kept
    assert len(depthwise) == sum(len(mixconv_groups(m)) for m in mixconvs)
    with torch.no_grad():
        assert loaded.module(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    stats = count(loaded.module, (3, 224, 224))
    assert {tuple(layer.kernel_sizes) for layer in stats.mixconv_layers} == {(3, 5, 7, 9)}


def test_tf_dropin_replaces_the_tf_same_padded_depthwise_convs_too(run_cli):
    """timm's TF ports pad stride-2 depthwise convs at run time (Conv2dSame): replaced like the others;
    a CondConv2d (per-sample expert kernels) cannot be, and says so in one line."""
    from conftest import assert_usage_error

    from mixnet_deploy import MixConv
    from mixnet_deploy.dropin import is_depthwise

    model = load_model("mixconv_tf_efficientnet_b0", input_size=(64, 64)).module
    mixconvs = {name for name, m in model.named_modules() if isinstance(m, MixConv)}
    left = [name for name, m in model.named_modules() if is_depthwise(m) and name.rpartition(".convs.")[0] not in mixconvs]
    assert len(mixconvs) == 16 and left == []  # EfficientNet-B0's 16 depthwise convs, 4 of them stride 2
    assert sum(m.convs[0].stride == (2, 2) for m in model.modules() if isinstance(m, MixConv)) == 4
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert_usage_error(run_cli("info", "mixconv_efficientnet_cc_b0_4e"), "blocks.4.0.conv_dw: a CondConv2d")
    # MaxViT partitions its maps into 8x8 windows: at 224 its 28x28 maps do not divide into them
    assert_usage_error(run_cli("info", "mixconv_maxvit_rmlp_pico_rw_256", "--input-size", "224"),
                       "mixconv_maxvit_rmlp_pico_rw_256 fails on a (2, 3, 224, 224) input: AssertionError",
                       "; give a size it runs at with --input-size")


def perturbed(state: dict) -> dict:
    """Weights unlike random-init's (a checkpoint left unread would go unnoticed with those)."""
    return {k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "state_dict_ema", "model_ema"])
def test_checkpoint_round_trip(tmp_path, wrapper):
    source = load_model("mixnet_s").module
    source.load_state_dict(perturbed(source.state_dict()))
    path = tmp_path / "w.pth"
    torch.save(source.state_dict() if wrapper is None else {wrapper: source.state_dict(), "epoch": 3}, path)
    loaded = load_model("mixnet_s", checkpoint=path)
    assert loaded.weights == str(path) and not loaded.random_init
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), source(x))
        assert not torch.allclose(load_model("mixnet_s").module(x), source(x), atol=1e-3)


def test_a_checkpoint_with_ema_weights_loads_those(tmp_path):
    """timm's training checkpoints hold both; the EMA weights are the ones evaluated and shipped."""
    plain, ema = (perturbed(load_model("mixnet_s").module.state_dict()) for _ in range(2))
    torch.save({"state_dict": plain, "state_dict_ema": ema, "epoch": 3}, tmp_path / "w.pth")
    loaded = load_model("mixnet_s", checkpoint=tmp_path / "w.pth").module.state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)


def test_checkpoints_as_trainers_write_them(tmp_path):
    """timm's train.py (its argparse Namespace beside the weights, its 'arch'), torch.compile over
    DDP (_orig_mod.module.) and weights without BatchNorm's num_batches_tracked (a state_dict of
    today's version, which PyTorch itself would refuse) load; a tf_mixnet checkpoint (the same keys,
    another padding) is refused for mixnet_s."""
    import argparse

    from mixnet_deploy.errors import MixdeployError

    weights = perturbed(load_model("mixnet_s").module.state_dict())

    def loads(state: dict) -> None:
        torch.save(state, tmp_path / "w.pth")
        loaded = load_model("mixnet_s", checkpoint=tmp_path / "w.pth").module.state_dict()
        assert all(torch.equal(loaded[k], weights[k]) for k in weights if "num_batches_tracked" not in k)

    trained = {"arch": "mixnet_s", "state_dict": weights, "args": argparse.Namespace(lr=0.1), "epoch": 3}
    loads(trained)
    loads({f"_orig_mod.module.{k}": v for k, v in weights.items()})
    pruned = load_model("mixnet_s").module.state_dict()  # keeps its _metadata (version 2 BatchNorms)
    for key in [k for k in pruned if k.endswith("num_batches_tracked")]:
        del pruned[key]
    pruned.update({k: v for k, v in weights.items() if k in pruned})
    loads(pruned)
    torch.save({**trained, "arch": "tf_mixnet_s"}, tmp_path / "tf.pth")
    with pytest.raises(MixdeployError, match="trained as tf_mixnet_s .* pass tf_mixnet_s as the model"):
        load_model("mixnet_s", checkpoint=tmp_path / "tf.pth")
    gray = {**weights, "preprocess": {"input_size": [1, 64, 64], "mean": [0.5], "std": [0.5]}}
    torch.save(gray, tmp_path / "gray.pth")
    with pytest.raises(MixdeployError, match="gives 1 input channel.*mixnet_s takes 3"):
        load_model("mixnet_s", checkpoint=tmp_path / "gray.pth")
    with pytest.raises(MixdeployError, match="timm publishes no pretrained weights for mixnet_xxl"):
        load_model("mixnet_xxl", pretrained=True)


def test_own_checkpoints_keep_their_own_prefixes(tmp_path):
    """A network of the user's own whose part is called `model` (keys model.*) loads its own
    state_dict, its buffer called `labels` too; wrapped by DataParallel (module.model.*) as well."""
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Wrap(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), "
        "nn.Flatten(), nn.Linear(8, 4))\n        self.register_buffer('labels', torch.arange(4))\n\n"
        "    def forward(self, x):\n        return self.model(x)\n\n\ndef build():\n    return Wrap()\n")
    weights = perturbed(load_model(f"{tmp_path}/net.py:build").module.state_dict())
    for state in (weights, {f"module.{k}": v for k, v in weights.items()}):
        torch.save(state, tmp_path / "w.pth")
        loaded = load_model(f"{tmp_path}/net.py:build", checkpoint=tmp_path / "w.pth").module.state_dict()
        assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_own_code_that_exits_or_names_no_usable_preprocessing_is_one_line(tmp_path):
    from mixnet_deploy.errors import MixdeployError

    (tmp_path / "train.py").write_text("import argparse\nargparse.ArgumentParser().parse_args(['--lr'])\n")
    with pytest.raises(MixdeployError, match="exits .* put that code under"):
        load_model(f"{tmp_path}/train.py:build")
    (tmp_path / "cubic.py").write_text(
        "from torch import nn\n\n\ndef build():\n    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), "
        "nn.Flatten())\n    net.pretrained_cfg = {'interpolation': 'cubic'}\n    return net\n")
    with pytest.raises(MixdeployError, match="pretrained_cfg: preprocess interpolation 'cubic' is not usable"):
        load_model(f"{tmp_path}/cubic.py:build")


def test_a_sibling_named_like_mixdeploys_own_modules_is_refused(tmp_path):
    """`import devices` beside FILE.py would give mixdeploy's devices package, already loaded."""
    from mixnet_deploy.errors import MixdeployError

    (tmp_path / "devices.py").write_text("WIDTH = 4\n")
    (tmp_path / "net.py").write_text("import devices\nfrom torch import nn\n\n\ndef build():\n"
                                     "    return nn.Sequential(nn.Conv2d(3, devices.WIDTH, 1))\n")
    with pytest.raises(MixdeployError, match="imports its sibling devices, which has the name of one of mixdeploy"):
        load_model(f"{tmp_path}/net.py:build")


def test_fresh_random_images_leave_torchs_generator_alone():
    from mixnet_deploy.preprocess import random_images

    torch.manual_seed(0)
    first = torch.rand(3)
    torch.manual_seed(0)
    random_images(2, (3, 32, 32))
    assert torch.equal(torch.rand(3), first)


def test_safetensors_checkpoint_with_other_class_count(tmp_path):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("mixnet_s", num_classes=10).eval()
    model.load_state_dict(perturbed(model.state_dict()))
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = load_model("mixnet_s", checkpoint=path)
    assert loaded.module.num_classes == 10 and loaded.labels is None
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x))
    from mixnet_deploy.errors import MixdeployError

    torch.save(timm.create_model("mixnet_s", num_classes=0).state_dict(), tmp_path / "features.pth")
    with pytest.raises(MixdeployError, match=r"features.pth has no classifier \(classifier.weight\): the weights of a "
                                             r"feature extractor\? mixdeploy exports classifiers"):
        load_model("mixnet_s", checkpoint=tmp_path / "features.pth")


def test_a_dropin_checkpoint_with_its_own_class_count_and_head(tmp_path):
    """EfficientViT keeps its classifier at head.classifier.4: timm's config says where to look."""
    import timm

    from mixnet_deploy import replace_depthwise

    model = timm.create_model("efficientvit_b0", num_classes=10)
    replace_depthwise(model, (3, 5, 7, 9))
    model.load_state_dict(perturbed(model.state_dict()))
    torch.save(model.state_dict(), tmp_path / "w.pth")
    loaded = load_model("mixconv_efficientvit_b0", checkpoint=tmp_path / "w.pth", input_size=(64, 64))
    assert loaded.num_classes == 10 and loaded.labels is None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model.eval()(x))


def test_exports_record_where_their_weights_are_and_what_they_were(tmp_path, monkeypatch):
    """A relative --checkpoint is recorded as an absolute path with its SHA-256: quantize and bench
    rebuild the model from any folder, and refuse weights changed since the export."""
    from conftest import randomize_batchnorm

    from mixnet_deploy.errors import MixdeployError
    from mixnet_deploy.models import reload

    monkeypatch.chdir(tmp_path)
    torch.save(load_model("mixnet_s").module.state_dict(), "w.pth")
    meta = load_model("mixnet_s", checkpoint="w.pth").metadata()
    assert meta["mixdeploy.weights"] == str((tmp_path / "w.pth").resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert reload(meta).sha256 == meta["mixdeploy.weights_sha256"]
    torch.save(randomize_batchnorm(load_model("mixnet_s").module).state_dict(), tmp_path / "w.pth")
    with pytest.raises(MixdeployError, match="has changed since the export was made from it"):
        reload(meta)
