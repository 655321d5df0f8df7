import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixnet_deploy import MixConv, replace_depthwise, split_channels


def test_partitions_match_the_paper():
    assert split_channels(32, 4, "equal") == [8, 8, 8, 8]
    assert split_channels(32, 4, "exponential") == [16, 8, 4, 4]
    assert split_channels(30, 4, "equal") == [9, 7, 7, 7]  # remainder to group 0, as timm
    with pytest.raises(ValueError):
        split_channels(3, 4)
    with pytest.raises(ValueError):
        split_channels(4, 4, "exponential")


def reference(x, mix: MixConv, dilations):
    """Split, depthwise-convolve each group with its own weights, concatenate."""
    outs, start = [], 0
    for conv, c, d in zip(mix.convs, mix.splits, dilations):
        k = conv.weight.shape[-1]
        part = x[:, start:start + c]
        outs.append(F.conv2d(part, conv.weight, conv.bias, conv.stride, d * (k - 1) // 2, d, groups=c))
        start += c
    return torch.cat(outs, 1)


@pytest.mark.parametrize("channels,kernels,stride,partition", [
    (32, (3, 5, 7, 9), 1, "equal"),
    (32, (3, 5, 7, 9), 2, "exponential"),
    (30, (3, 5, 7), 1, "equal"),
    (24, (3, 11, 13), 2, "equal"),
])
def test_mixconv_equals_split_concat_reference(channels, kernels, stride, partition):
    torch.manual_seed(0)
    mix = MixConv(channels, kernels, stride, partition, bias=True).eval()
    x = torch.randn(2, channels, 17, 19)
    y = mix(x)
    assert y.shape == (2, channels, (17 - 1) // stride + 1, (19 - 1) // stride + 1)
    torch.testing.assert_close(y, reference(x, mix, [1] * len(kernels)), rtol=1e-5, atol=1e-6)


def test_dilated_variant_uses_3x3_with_matching_receptive_field():
    torch.manual_seed(1)
    mix = MixConv(32, (3, 5, 7, 9), dilated=True).eval()
    assert [c.kernel_size for c in mix.convs] == [(3, 3)] * 4
    assert [c.dilation[0] for c in mix.convs] == [1, 2, 3, 4]
    x = torch.randn(1, 32, 20, 20)
    torch.testing.assert_close(mix(x), reference(x, mix, [1, 2, 3, 4]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="stride 1"):
        MixConv(32, (3, 5), stride=2, dilated=True)


@pytest.mark.parametrize("args,message", [
    ((32, 3), "non-empty sequence"), ((32, "35"), "non-empty sequence"), ((32, []), "non-empty sequence"),
    ((32, [3.0, 5]), "odd and positive"), ((32.0, [3, 5]), "positive int"), ((32, [3, 5], 0), "stride"),
    ((32, [3, 5], 2.5), "stride"), ((32, [3, 4]), "odd and positive"),
])
def test_mixconv_refuses_bad_arguments_in_its_own_words(args, message):
    with pytest.raises(ValueError, match=message):
        MixConv(*args)


def test_replace_depthwise_keeps_output_sizes_and_is_all_or_none():
    same = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1, groups=16), nn.Conv2d(16, 16, 5, 1, 2, groups=16))
    assert replace_depthwise(same, (3, 5)) == 2 and all(isinstance(m, MixConv) for m in same)
    assert same(torch.randn(1, 16, 9, 9)).shape == (1, 16, 5, 5)
    unpadded = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 0, groups=8))  # 9x9 -> 4x4; a MixConv would give 5x5
    with pytest.raises(ValueError, match="^0: depthwise conv .* would change its output size"):
        replace_depthwise(unpadded, (3, 5))
    narrow = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1, groups=64), nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8)))
    with pytest.raises(ValueError, match="^1.0: cannot split 8 channels into 10 groups"):
        replace_depthwise(narrow, range(3, 22, 2))
    assert type(narrow[0]) is nn.Conv2d  # untouched: the first layer could take a MixConv, the second could not
