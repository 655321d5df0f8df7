import copy

import pytest
import torch
from conftest import SWEEP_SIZE, randomize_batchnorm
from timm.layers import MixedConv2d
from torch import nn

from mixnet_deploy import MixConv, MixdeployError, load_model
from mixnet_deploy.deploy_modules import BlockConv, LoweredMixConv
from mixnet_deploy.lower import LoweringError, analyse, lower, preset_plan, signatures, verify
from mixnet_deploy.plan import DepthwiseChoice, Plan, depthwise_candidates, pieces
from mixnet_deploy.parity import compare, float32_error, reference_outputs
from mixnet_deploy.preprocess import random_images, sample_photos


def block(mix: nn.Module, channels: int, first: int = 1) -> nn.Module:
    """first x first conv -> MixConv -> BatchNorm -> ReLU, the way timm uses a MixConv."""
    conv = nn.Conv2d(channels, channels, first, padding=first // 2)
    model = nn.Sequential(conv, mix, nn.BatchNorm2d(channels), nn.ReLU()).eval()
    return randomize_batchnorm(model)


LAYERS = {
    "uneven": lambda: MixConv(30, (3, 5, 7, 9)),
    "big kernels": lambda: MixConv(24, (3, 11, 13)),
    "exponential stride 2": lambda: MixConv(32, (3, 5, 7, 9), stride=2, partition="exponential"),
    "dilated": lambda: MixConv(32, (3, 5, 7, 9), dilated=True),
    "one-channel groups": lambda: MixConv(4, (9, 3, 5)),  # 2, 1, 1 channels: fold<=5 merges two of one
    "one-channel first group": lambda: MixConv(8, (3, 5, 7), partition=[1, 3, 4]),  # its conv has groups=1
}


@pytest.mark.parametrize("first", [1, 3])  # fed by a 1x1 conv it takes its rows; by a 3x3 it stays whole
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_every_choice_on_a_single_layer_equals_the_original(layer, first):
    torch.manual_seed(0)
    mix = LAYERS[layer]()
    channels = sum(mix.splits)
    model = block(mix, channels, first)
    info, = analyse(model, (channels, 19, 21))
    assert len(info.candidates) >= 6
    x = torch.randn(3, channels, 19, 21)
    for choice in info.candidates:
        lowered = lower(model, (channels, 19, 21), Plan({"1": choice}))
        assert not any(isinstance(m, nn.BatchNorm2d) for m in lowered.module.modules())
        with torch.no_grad():
            ref, out = model(x), lowered.module(x)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), choice


def test_choices_build_what_they_say():
    model = block(MixConv(32, (3, 5, 7, 9)), 32, first=3)  # a 3x3 conv: the MixConv keeps its own split
    built = {c: lower(model, (32, 16, 16), Plan({"1": c})).module[1] for c in ("split", "fold", "fold<=5", "fold+block3", "split+block5", "split+strips", "split+pairs")}
    assert [len(m.segments) for m in (built["split"], built["fold<=5"])] == [4, 3]
    assert built["fold"].segments[0].kernel_size == (9, 9) and len(built["fold"].segments) == 1
    assert isinstance(built["fold+block3"].segments[0], BlockConv) and len(built["fold+block3"].segments[0].pieces) == 9
    five = built["split+block5"].segments
    assert [type(s).__name__ for s in five] == ["DeployConv", "DeployConv", "BlockConv", "BlockConv"]
    assert isinstance(built["split"], LoweredMixConv)
    assert [len(s.pieces) for s in built["split+strips"].segments[2:]] == [3, 5]  # 7x7: 3 strips, 9x9: 5
    pairs = built["split+pairs"].segments[2:]  # 7x7: band + 2 pairs, 9x9: row + 4 pairs, none needs a crop
    assert [len(s.pieces) for s in pairs] == [3, 5] and all(None not in s.own_pads for s in pairs)
    assert None in built["split+strips"].segments[2].own_pads  # the top strip reads a window of the padded input


def test_aligned_choices_move_segment_boundaries_down_to_the_block():
    model = block(MixConv(60, (3, 5, 7)), 60, first=3)  # groups of 20: boundaries at 20, 40
    built = lower(model, (60, 12, 12), Plan({"1": "split@16"})).module[1]
    assert built.splits == [16, 16, 28] and [s.kernel_size[0] for s in built.segments] == [3, 5, 7]
    assert "split@16" in depthwise_candidates([3, 5, 7], [20, 20, 20])
    assert not any("@" in c for c in depthwise_candidates([3, 5, 7], [16, 32, 16]))  # already aligned
    assert str(DepthwiseChoice.parse("fold<=5@16+pairs")) == "fold<=5@16+pairs"
    # a plan may align any candidate to any block, cut or not, as the README says; each lowers exactly
    for choice, splits in (("split@8", [16, 24, 20]), ("fold<=5@16+pairs", [32, 28]), ("split@32+strips", [32, 28])):
        lowered = lower(model, (60, 12, 12), Plan({"1": choice}))
        assert lowered.module[1].splits == splits and lowered.parity.rel_max < 1e-10, choice
    with pytest.raises(MixdeployError, match="does not fit"):  # the choice unaligned is no candidate either
        lower(model, (60, 12, 12), Plan({"1": "fold<=3@16"}))
    with pytest.raises(MixdeployError):
        DepthwiseChoice.parse("split@1")


def test_candidates_and_choice_grammar():
    assert depthwise_candidates([3, 5], [16, 16]) == ["split", "split+block3", "fold", "fold+block3"]
    assert "split+strips" in depthwise_candidates([3, 5, 7], [16, 16, 16]) and "fold+strips" not in depthwise_candidates([3, 5], [16, 16])
    assert pieces(7, "strips") == [(0, 0, 3, 7, 1), (3, 0, 3, 7, 1), (6, 0, 1, 7, 1)]
    assert pieces(9, "strips") == [(i, 0, 2 if i < 8 else 1, 9, 1) for i in range(0, 9, 2)]
    assert len(pieces(7, "block5")) == 4 and all(p.height * p.width <= 25 for p in pieces(11, "strips"))
    assert pieces(7, "pairs") == [(2, 0, 3, 7, 1), (1, 0, 2, 7, 4), (0, 0, 2, 7, 6)]  # rows 2-4, {1, 5}, {0, 6}
    assert all(p.height * p.width <= 25 for k in (7, 9, 11) for p in pieces(k, "pairs"))
    assert "split+pairs" in depthwise_candidates([3, 5, 7], [16, 16, 16]) and "split+pairs" not in depthwise_candidates([3, 5], [16, 16])
    assert "fold+pairs" not in depthwise_candidates([3, 13], [16, 16])  # a 13-wide row pair has 26 taps
    assert depthwise_candidates([3], [16]) == ["split"]
    assert str(DepthwiseChoice.parse("fold<=7+block5")) == "fold<=7+block5"
    with pytest.raises(MixdeployError):
        DepthwiseChoice.parse("fold<7")


def expansion_block(expand_groups: int, kernels: tuple[int, ...], skip: bool = False) -> nn.Module:
    """An inverted-residual start: grouped 1x1 expansion -> BatchNorm -> SiLU -> depthwise MixConv."""
    from timm.layers import MixedConv2d

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = MixedConv2d(24, 96, [1] * expand_groups)
            self.bn = nn.BatchNorm2d(96)
            self.act = nn.SiLU()
            self.dw = MixConv(96, kernels)

        def forward(self, x):
            y = self.act(self.bn(self.pw(x)))
            return self.dw(y) + (y if skip else 0)

    return randomize_batchnorm(Block().eval())


def test_each_segment_gets_its_own_rows_of_the_expansion():
    from mixnet_deploy.deploy_modules import ExpandedMixConv

    x = torch.randn(2, 24, 12, 12)
    for groups, kernels, inputs in ((1, (3, 5, 7), [(0, 24)] * 3), (2, (3, 5), [(0, 12), (12, 24)]),
                                    (2, (3, 5, 7, 9), [(0, 12), (0, 12), (12, 24), (12, 24)]),
                                    (2, (3, 5, 7), [(0, 12), (0, 24), (12, 24)])):  # the middle one spans both groups
        model = expansion_block(groups, kernels)
        lowered = lower(model, (24, 12, 12), Plan({"dw": "split"})).module
        assert isinstance(lowered.pw, ExpandedMixConv) and lowered.pw.inputs == inputs
        assert isinstance(lowered.act, nn.Identity) and isinstance(lowered.dw, nn.Identity)
        with torch.no_grad():
            ref = model(x)
            assert (lowered(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    # not rewritten: a folded MixConv (one segment), an expansion read twice
    for model, choice in ((expansion_block(1, (3, 5)), "fold"), (expansion_block(1, (3, 5), skip=True), "split")):
        lowered = lower(model, (24, 12, 12), Plan({"dw": choice})).module
        assert not any(isinstance(m, ExpandedMixConv) for m in lowered.modules()), choice


def relu_after_split_mixconvs() -> list[tuple[nn.Module, nn.Module]]:
    """(model, lowered module) for a ReLU after a split MixConv fed by an expansion conv (through
    an Identity) and a ReLU6 after one fed by the block input."""
    torch.manual_seed(0)
    expanded = nn.Sequential(nn.Conv2d(24, 96, 1), nn.BatchNorm2d(96), nn.ReLU(), MixConv(96, (3, 5, 7)),
                             nn.BatchNorm2d(96), nn.Identity(), nn.ReLU(), nn.Conv2d(96, 16, 1))
    direct = nn.Sequential(MixConv(24, (3, 5)), nn.ReLU6(), nn.Conv2d(24, 16, 1))
    return [(randomize_batchnorm(model.eval()), lower(model, (24, 12, 12), Plan({layer: "split"})).module)
            for model, layer in ((expanded, "3"), (direct, "0"))]


def test_batchnorm_without_affine_folds_and_one_without_statistics_stays():
    """affine=False folds as weight 1, bias 0; track_running_stats=False normalises by each batch's
    own statistics, so no conv can absorb it: it stays, and the lowered model still equals the original."""
    torch.manual_seed(0)
    plain, batchwise = nn.BatchNorm2d(24, affine=False), nn.BatchNorm2d(24, track_running_stats=False)
    model = nn.Sequential(MixConv(24, (3, 5, 7)), plain, nn.ReLU(), nn.Conv2d(24, 24, 1), batchwise).eval()
    plain.running_mean.uniform_(-0.5, 0.5)
    plain.running_var.uniform_(0.5, 2.0)
    lowered = lower(model, (24, 12, 12), Plan({"0": "split"})).module
    assert [type(m) for m in lowered.modules() if isinstance(m, nn.BatchNorm2d)] == [nn.BatchNorm2d]
    x = torch.randn(3, 24, 12, 12)
    with torch.no_grad():
        ref, out = model(x), lowered(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_a_conv_that_changes_its_weight_at_run_time_stays_with_its_batchnorm():
    """timm's StdConv2d standardises its weight in forward: a BatchNorm folded into its raw weight
    would compute something else, so both stay as written; the plain convs around them still lower."""
    from timm.layers import StdConv2d

    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(StdConv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                                              MixConv(24, (3, 5, 7)), nn.BatchNorm2d(24)).eval())
    lowered = lower(model, (3, 12, 12), Plan({"3": "split"}))
    kinds = [type(m) for m in lowered.module.children()]
    assert kinds[:2] == [StdConv2d, nn.BatchNorm2d] and LoweredMixConv in kinds and kinds.count(nn.BatchNorm2d) == 1
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        ref, out = model(x), lowered.module(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_a_look_at_a_training_model_leaves_it_as_it_was():
    """analyse (the planners' look) and count run the model once, in eval mode: a training model's
    BatchNorm statistics do not move, and every module keeps its own mode."""
    from mixnet_deploy.complexity import count

    model = block(MixConv(16, (3, 5)), 16).train()
    model[0].eval()
    modes, before = [m.training for m in model.modules()], copy.deepcopy(model.state_dict())
    assert analyse(model, (16, 8, 8)) and count(model, (16, 8, 8)).mixconv_layers
    assert [m.training for m in model.modules()] == modes and modes[0] and not modes[1]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_batchnorm_is_folded_only_into_a_conv_it_alone_reads():
    """bn(y) + y needs y unfolded, and so does y changed in place (relu_, an assignment) before its
    BatchNorm: the BatchNorm stays; one after a conv read by nothing else folds."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix, self.bn = MixConv(24, (3, 5, 7)), nn.BatchNorm2d(24)
            self.conv, self.bn2 = nn.Conv2d(24, 24, 1), nn.BatchNorm2d(24)
            self.conv3, self.bn3 = nn.Conv2d(24, 24, 1), nn.BatchNorm2d(24)

        def forward(self, x):
            y = self.mix(x)
            z = self.conv(self.bn(y) + y)
            w = self.conv3(self.bn2(z.relu_()))
            w[:, :2] = 0.5  # changed in place too: bn3 cannot fold either
            return self.bn3(w)

    model = randomize_batchnorm(Residual().eval())
    lowered = lower(model, (24, 12, 12), Plan({"mix": "split"}))
    assert lowered.parity.rel_max < 1e-10
    assert [n for n, m in lowered.module.named_modules() if isinstance(m, nn.BatchNorm2d)] == ["bn", "bn2", "bn3"]
    alone = randomize_batchnorm(nn.Sequential(nn.Conv2d(24, 24, 1), nn.BatchNorm2d(24)).eval())
    assert not [m for m in lower(alone, (24, 12, 12), Plan({})).module.modules() if isinstance(m, nn.BatchNorm2d)]


def test_a_relu_after_a_split_mixconv_moves_into_its_segments():
    from mixnet_deploy.deploy_modules import ExpandedMixConv

    x = torch.randn(2, 24, 12, 12)
    for (model, lowered), kind in zip(relu_after_split_mixconvs(), (nn.ReLU, nn.ReLU6)):
        mix, = [m for m in lowered if isinstance(m, (LoweredMixConv, ExpandedMixConv))]
        assert isinstance(mix.out_act, kind) and not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in lowered)
        with torch.no_grad():
            ref = model(x)
            assert (lowered(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    # left after the concatenation: a MixConv whose output is read twice, a ReLU module called
    # twice, a ReLU called with a keyword argument
    class Twice(nn.Module):
        def __init__(self, case: str):
            super().__init__()
            self.mix, self.relu, self.case = MixConv(24, (3, 5)), nn.ReLU(), case

        def forward(self, x):
            y = self.mix(x)
            if self.case == "keyword":
                return self.relu(input=y)
            return self.relu(y) + (self.relu(x) if self.case == "shared" else y)

    for case in ("read twice", "shared", "keyword"):
        lowered = lower(Twice(case).eval(), (24, 12, 12), Plan({"mix": "split"})).module
        assert isinstance(lowered.relu, nn.ReLU) and isinstance(lowered.mix.out_act, nn.Identity), case


def test_probes_are_fed_by_the_layers_own_expansion():
    from mixnet_deploy.deploy_modules import ExpandedMixConv
    from mixnet_deploy.probes import probe, probe_input, probed_layer

    expand, info = analyse(expansion_block(2, (3, 5, 7)), (24, 12, 12))
    assert (expand.kind, expand.feed, info.kind, info.feed) == ("pointwise", None, "depthwise", (24, 2))
    assert [i.feed for i in analyse(block(MixConv(30, (3, 5)), 30, first=3), (30, 8, 8))] == [None]  # fed by a 3x3
    assert probe_input(info) == (24, 12, 12)
    layer = probed_layer(probe(info, "split"))  # 32 channels each: the middle segment spans both expansion groups
    assert isinstance(layer, ExpandedMixConv) and layer.inputs == [(0, 12), (0, 24), (12, 24)]


def test_probes_time_the_layers_own_kernels():
    """A dilated MixConv's probe runs its dilated 3x3 kernels (split keeps them), not the dense
    kernels they span, and is timed apart from a dense layer of that shape; an even kernel probes too."""
    from mixnet_deploy.cost_model import shape_key
    from mixnet_deploy.probes import probe, probed_layer

    dilated, = analyse(block(MixConv(32, (3, 5, 7), dilated=True), 32, first=3), (32, 12, 12))
    dense, = analyse(block(MixConv(32, (3, 5, 7)), 32, first=3), (32, 12, 12))
    assert dilated.kernels == dense.kernels and dilated.dilations == [1, 2, 3] and dense.dilations == [1, 1, 1]
    assert shape_key(dilated) != shape_key(dense) and "dilation" not in shape_key(dense)
    split = probed_layer(probe(dilated, "split"))
    assert [(s.kernel_size[0], s.dilation[0]) for s in split.segments] == [(3, 1), (3, 2), (3, 3)]
    even, = analyse(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 4, padding="same", groups=8)),
                    (8, 9, 9))
    for choice in even.candidates:
        assert probe(even, choice).parity.rel_max < 1e-10


def test_a_model_fx_cannot_trace_still_lowers():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = expansion_block(1, (3, 5))

        def forward(self, x):
            return self.body(x) if x.mean() > -1e9 else -self.body(x)  # control flow on the input

    model = Branchy().eval()
    lowered = lower(model, (24, 12, 12), Plan({"body.dw": "split"}))
    assert lowered.parity.rel_max < 1e-10 and isinstance(lowered.module.body.dw, LoweredMixConv)


class SplitCat(nn.Module):
    """A MixConv as users write it: torch.split, a depthwise conv per part, torch.cat."""

    def __init__(self, channels: int, kernels: tuple[int, ...], stride: int = 1):
        super().__init__()
        self.sizes = [channels // len(kernels)] * len(kernels)
        self.sizes[0] += channels - sum(self.sizes)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False)
                                   for c, k in zip(self.sizes, kernels))

    def forward(self, x):
        return torch.cat([conv(part) for conv, part in zip(self.convs, torch.split(x, self.sizes, 1))], 1)


class Slices(nn.Module):
    """... with slices and convs held as attributes, one with a bias and dilation."""

    def __init__(self):
        super().__init__()
        self.small, self.big = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(16, 16, 3, padding=3, dilation=3,
                                                                                  groups=16, bias=False)

    def forward(self, x):
        return torch.cat((self.small(x[:, :8]), self.big(x[:, 8:])), dim=1)


class Chunked(nn.Module):
    """... a grouped 1x1 conv (MixNet's pointwise MixConv) with chunk."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(12, 20, 1), nn.Conv2d(12, 20, 1)

    def forward(self, x):
        a, b = x.chunk(2, 1)
        return torch.cat([self.a(a), self.b(b)], 1)


class SameHalf(nn.Module):
    """Not a MixConv: both convs read the first half of the input."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.Conv2d(12, 12, 5, padding=2, groups=12)

    def forward(self, x):
        return torch.cat([self.a(x[:, :12]), self.b(x[:, :12])], 1)


class Wrapped(nn.Module):
    """A MixConv inside another module: the inner one is the MixConv, listed once."""

    def __init__(self, mix: nn.Module):
        super().__init__()
        self.mix = mix

    def forward(self, x):
        return self.mix(x)


class Backwards(SplitCat):
    """Not one either, read in registration order: its convs take the parts in reverse."""

    def forward(self, x):
        parts = torch.split(x, self.sizes[::-1], 1)
        return torch.cat([conv(p) for conv, p in zip(self.convs[::-1], parts)], 1)


@pytest.mark.parametrize("make, channels, kernels", [
    (lambda: SplitCat(30, (3, 5, 7, 9), stride=2), [9, 7, 7, 7], [3, 5, 7, 9]),
    (Slices, [8, 16], [3, 7]),
    (Chunked, [12, 12], [1, 1]),
])
def test_a_mixconv_of_the_users_own_is_recognised_and_lowered(make, channels, kernels):
    """Recognised by what it computes, however its forward() is written: listed, lowered by every
    candidate and its BatchNorm folded into it, exactly."""
    torch.manual_seed(0)
    mix = make()
    cin, cout = sum(channels), sum(c.out_channels for c in mix.modules() if isinstance(c, nn.Conv2d))
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1), mix, nn.BatchNorm2d(cout),
                                              nn.ReLU()).eval())
    info, = analyse(model, (cin, 19, 21))
    assert (info.name, info.channels, info.kernels) == ("1", channels, kernels)
    for choice in info.candidates:
        lowered = lower(model, (cin, 19, 21), Plan({"1": choice}))
        assert lowered.parity.rel_max < 1e-10, choice
        assert not [m for m in lowered.module.modules() if isinstance(m, (nn.BatchNorm2d, type(mix)))], choice


@pytest.mark.parametrize("make", [SameHalf, lambda: Backwards(24, (3, 5, 7))])
def test_what_only_looks_like_a_mixconv_is_left_as_written(make):
    """Convs that do not read consecutive parts in their order are no MixConv, whatever their weights
    (zeros would make any order compute the same): each lowers as itself."""
    model = nn.Sequential(make(), nn.ReLU()).eval()
    for conv in model[0].modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.zeros_(conv.weight)
    assert "0" not in [layer.name for layer in analyse(model, (24, 16, 16))]
    for conv in model[0].modules():  # lowered with weights that make the order matter, so parity can fail
        if isinstance(conv, nn.Conv2d):
            nn.init.normal_(conv.weight)
    lowered = lower(model, (24, 16, 16), Plan({}))
    assert lowered.parity.rel_max < 1e-10 and isinstance(lowered.module[0], type(model[0]))


@pytest.mark.parametrize("make", [lambda: SplitCat(24, (3, 5, 7)), lambda: MixedConv2d(24, 24, [3, 5, 7], depthwise=True)])
def test_a_mixconv_wrapped_in_a_module_is_listed_once(make):
    model = nn.Sequential(Wrapped(make()), nn.ReLU()).eval()
    assert [layer.name for layer in analyse(model, (24, 16, 16))] == ["0.mix"]


@pytest.mark.parametrize("choice", ["grouped", "dense", "split"])
@pytest.mark.parametrize("channels", [(16, 32), (15, 33), (32, 32)])
def test_grouped_pointwise_choices(choice, channels):
    from timm.layers import MixedConv2d

    cin, cout = channels
    model = block(MixedConv2d(cin, cout, [1, 1]), cout) if cin == cout else nn.Sequential(
        nn.Conv2d(cin, cin, 1), MixedConv2d(cin, cout, [1, 1, 1]), nn.BatchNorm2d(cout)).eval()
    randomize_batchnorm(model)
    info, = analyse(model, (cin, 8, 8))
    assert info.kind == "pointwise"
    if cin == 16 and choice == "grouped":  # three uneven groups (6, 5, 5 -> 11, 11, 10) make no grouped conv
        assert info.candidates == ["dense", "split"]
        with pytest.raises(MixdeployError, match="'grouped' does not fit"):
            lower(model, (cin, 8, 8), Plan({"1": choice}))
        return
    lowered = lower(model, (cin, 8, 8), Plan({"1": choice}))
    assert lowered.parity.rel_max < 1e-10  # exact but for float64 rounding
    if choice != "split":
        assert lowered.module[1].groups == (len(info.kernels) if choice == "grouped" else 1)


def test_tf_same_padding_becomes_static():
    loaded = load_model("tf_mixnet_s")
    randomize_batchnorm(loaded.module)
    layers = analyse(loaded.module, (3, 224, 224))
    for preset in ("split", "fold"):
        lowered = lower(loaded.module, (3, 224, 224), preset_plan(layers, preset, "onnxruntime"),
                        check_inputs=sample_photos(loaded.preprocess, 4))
        from timm.layers import Conv2dSame
        assert not any(isinstance(m, (Conv2dSame, nn.BatchNorm2d)) for m in lowered.module.modules())
        assert lowered.parity.rel_max < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixnet_s", "mixnet_m", "mixconv_mobilenetv2_100"])
def test_whole_models_lower_with_every_preset_and_on_photos(name):
    loaded = load_model(name, input_size=None if name == "mixnet_s" else SWEEP_SIZE)
    randomize_batchnorm(loaded.module, seed=3)
    layers = analyse(loaded.module, loaded.preprocess.input_size)
    photos = sample_photos(loaded.preprocess, 6)
    x = torch.cat([random_images(2, loaded.preprocess.input_size), photos[:2]])
    reference = reference_outputs(loaded.module, x)
    floor = float32_error(loaded.module, x, reference)
    for plan in (preset_plan(layers, "split", "onnxruntime"), preset_plan(layers, "fold", "onnxruntime"),
                 Plan({layer.name: layer.candidates[-1] for layer in layers})):
        lowered = lower(loaded.module, loaded.preprocess.input_size, plan, check_inputs=photos)
        assert lowered.parity.samples == 4 + len(photos) and lowered.parity.top1_agreement == 1.0
        # the rewrite is verified before its float64 weights are rounded: exact but for float64 rounding
        assert lowered.parity.rel_max < 1e-10, lowered.parity.summary()
        assert all(p.dtype == torch.float32 for p in lowered.module.parameters())
        # the float32 module returned, run as exporters take it: within float32's own error of the model
        with torch.no_grad():
            out = lowered.module(x).numpy()
        assert compare(reference, out).rel_max <= max(1e-5, 2 * floor), plan.layers


def test_bad_plans_are_rejected():
    model = block(MixConv(32, (3, 5)), 32)
    with pytest.raises(MixdeployError, match="not MixConv layers of this model"):
        lower(model, (32, 8, 8), Plan({"nope": "fold"}))
    with pytest.raises(MixdeployError, match="does not fit"):
        lower(model, (32, 8, 8), Plan({"1": "fold<=7"}))
    with pytest.raises(MixdeployError, match="layers"):
        Plan.from_dict({"fold": 1})
    with pytest.raises(MixdeployError, match="plan choice None does not fit 1"):  # not lowered as split, unsaid
        lower(model, (32, 8, 8), Plan.from_dict({"layers": {"1": None}}))


def test_a_plan_without_shapes_comes_back_with_them():
    """A plan from an older file or written by hand is returned recording what each layer is, so the
    file it goes into can refuse another model."""
    model = block(MixConv(32, (3, 5)), 32)
    lowered = lower(model, (32, 8, 8), Plan({"1": "fold"}, "litert", "file"))
    assert lowered.plan.shapes == signatures(analyse(model, (32, 8, 8)))
    assert lowered.plan.shapes["1"] == "depthwise [16, 16]->[16, 16] kernels [3, 5] stride 1"
    assert (lowered.plan.layers, lowered.plan.target, lowered.plan.source) == ({"1": "fold"}, "litert", "file")


def test_a_segment_of_zero_weights_keeps_its_bias():
    """A BatchNorm gamma of 0 on one group (pruned channels) zeroes every piece of its cut kernel:
    the segment still gives the BatchNorm's shift."""
    model = block(MixConv(16, (3, 9)), 16)
    randomize_batchnorm(model)
    with torch.no_grad():
        model[2].weight[8:] = 0
    assert lower(model, (16, 12, 12), Plan({"1": "split+block3"})).parity.rel_max < 1e-10


def test_an_unmeasured_grouped_pointwise_layer_is_not_made_dense_for_free():
    """LiteRT's fitted 1x1 weight is 0 (the fit put that work elsewhere): a floor keeps a dense conv,
    three times a grouped conv's multiply-adds, from pricing the same."""
    from mixnet_deploy.cost_model import CostModel
    from mixnet_deploy.lower import discover, layer_info

    costs = CostModel.load("litert")
    for out, groups, cheapest in ((256, [1, 1], "grouped"), (512, [1, 1, 1], "split")):  # 512 = 172 + 170 + 170
        site, = discover(nn.Sequential(MixedConv2d(512, out, groups)), (512, 28, 28))
        choice, priced = costs.choose(site, layer_info(site))
        assert choice == cheapest and priced["dense"] > priced[cheapest], priced


def test_verification_catches_a_wrong_lowering():
    model = block(MixConv(32, (3, 5)), 32)
    lowered = lower(model, (32, 8, 8), Plan({"1": "fold"})).module
    with torch.no_grad():
        lowered[1].segments[0].weight[0, 0, 2, 2] += 0.5
    with pytest.raises(LoweringError, match="differs"):
        verify(model, lowered, (32, 8, 8))


def test_auto_plan_comes_from_the_measured_onnxruntime_table():
    from mixnet_deploy.cost_model import CostModel
    from mixnet_deploy.planner import make_plan

    costs = CostModel.load("onnxruntime")
    assert costs.table and costs.source["samples"] > 100 and "machine" in costs.source
    loaded = load_model("mixnet_s")
    plan = make_plan("auto", loaded.module, (3, 224, 224), "onnxruntime")
    layers = analyse(loaded.module, (3, 224, 224))
    assert set(plan.layers) == {layer.name for layer in layers}
    from mixnet_deploy.cost_model import shape_key
    for layer in layers:  # every mixnet_s shape was probed: the pick is the measured fastest
        measured = costs.table[shape_key(layer)]
        assert plan.layers[layer.name] == min(measured, key=measured.get)
    assert lower(loaded.module, (3, 224, 224), plan).parity.rel_max < 1e-10


def test_cost_model_fit_recovers_known_weights():
    from mixnet_deploy.cost_model import FEATURES, fit

    truth = dict.fromkeys(FEATURES, 0.0) | {"dw_taps": 2e-7, "split_elems": 1e-7, "segments": 0.01}
    rng = torch.Generator().manual_seed(0)
    samples = []
    for probe in range(20):
        for cand in range(4):
            f = {k: float(torch.rand(1, generator=rng)) * 1e6 if k != "segments" else float(cand) for k in FEATURES}
            samples.append((str(probe), f, 0.3 * probe + sum(truth[k] * f[k] for k in FEATURES)))
    weights = fit(samples)
    for k in ("dw_taps", "split_elems", "segments"):
        assert abs(weights[k] - truth[k]) < 1e-3 * truth[k] + 1e-12


def test_cost_model_chooses_among_measured_candidates_only():
    from mixnet_deploy.cost_model import FEATURES, CostModel, shape_key
    from mixnet_deploy.lower import discover, layer_info

    model = block(MixConv(32, (3, 5, 7)), 32)
    site, = [s for s in discover(model, (32, 8, 8)) if layer_info(s) is not None]
    info = layer_info(site)
    weights = dict.fromkeys(FEATURES, 0.0) | {"dw_taps": 1e-6}
    old_table = {shape_key(info): {"split": 2.0, "split+block5": 1.0}}  # measured before +strips existed
    choice, costs = CostModel("t", weights, 16, old_table).choose(site, info)
    assert (choice, set(costs)) == ("split+block5", {"split", "split+block5"})
    choice, costs = CostModel("t", weights, 16, {}).choose(site, info)  # not probed: the linear model
    assert set(costs) == set(info.candidates) and "split+strips" in costs


@pytest.mark.parametrize("hw,stride", [(1, 1), (2, 1), (3, 2), (2, 2)])
def test_tiny_maps_crop_kernels_that_only_meet_padding(hw, stride):
    torch.manual_seed(2)
    model = block(MixConv(48, (3, 5, 7, 9, 11, 13), stride=stride), 48)
    info, = analyse(model, (48, hw, hw))
    x = torch.randn(2, 48, hw, hw)
    with torch.no_grad():
        ref = model(x)
    for choice in info.candidates:
        lowered = lower(model, (48, hw, hw), Plan({"1": choice})).module
        with torch.no_grad():
            assert (lowered(x) - ref).abs().max() <= 1e-5 * ref.abs().max(), choice
    folded = lower(model, (48, hw, hw), Plan({"1": "fold"})).module[1].segments[0]
    assert folded.kernel_size[0] <= 2 * hw + 1 < 13


def test_same_padding_in_every_form_lowers_exactly():
    """PyTorch's padding='same' (an even kernel pads one more after), timm's export-time TF-'same'
    conv, and a reflect-padded conv (left as it is: folding zero pads into it would be wrong)."""
    from timm.layers.conv2d_same import Conv2dSameExport

    size = (8, 15, 13)
    for conv, kept in ((nn.Conv2d(8, 8, 4, padding="same", groups=8), False), (nn.Conv2d(8, 8, 5, padding="same", dilation=2), False),
                       (Conv2dSameExport(8, 8, 3, stride=2, groups=8), False), (nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), True)):
        model = randomize_batchnorm(nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU()).eval())
        lowered = lower(model, size, Plan())
        assert lowered.parity.rel_max < 1e-10, conv
        assert (type(lowered.module[0]) is nn.Conv2d) == kept and isinstance(lowered.module[1], nn.BatchNorm2d) == kept
