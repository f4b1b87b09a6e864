"""BatchNorm folding: the folded backbones compute what the unfolded ones compute, within float32 noise."""
import copy

import pytest
import torch
from torch import nn

from streampetr_plugin.models.backbones.resnet import ResNet, ResNetParams
from streampetr_plugin.models.backbones.vovnet import VoVNet, VoVNetParams
from streampetr_plugin.models.batchnorm_folding import fold_batchnorm, fold_conv_batchnorm
from tests.test_backbones import batchnorms, randomise_batchnorm_statistics

# float32 noise through a few dozen convolutions: the folded weights round differently, nothing more.
RELATIVE_TOLERANCE = 1e-5


@pytest.mark.parametrize(
    "build",
    [lambda: ResNet(ResNetParams(out_indices=(0, 1, 2, 3))),
     lambda: VoVNet(VoVNetParams(spec_name="V-tiny", out_features=("stage2", "stage3", "stage4", "stage5")))],
    ids=["resnet50", "vovnet_tiny"],
)
def test_folded_backbone_matches_unfolded_and_keeps_no_batchnorm(build):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    backbone = build().eval()
    randomise_batchnorm_statistics(backbone, generator)
    images = torch.randn(2, 3, 64, 96, generator=generator)
    folded = copy.deepcopy(backbone)
    report = fold_batchnorm(folded)
    assert (report.folded, report.left) == (len(batchnorms(backbone)), 0)
    with torch.no_grad():
        expected, actual = backbone(images), folded(images)
    assert list(actual) == list(expected)
    for name in expected:
        scale = expected[name].abs().max()
        assert (actual[name] - expected[name]).abs().max() <= RELATIVE_TOLERANCE * scale, name


def test_fold_keeps_a_convolution_bias_and_matches_the_batchnorm_formula():
    generator = torch.Generator().manual_seed(1)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        conv.bias.copy_(torch.randn(4, generator=generator))
        bn.running_mean.copy_(torch.randn(4, generator=generator))
        bn.running_var.copy_(torch.rand(4, generator=generator) + 0.1)
        bn.weight.copy_(torch.randn(4, generator=generator))
        bn.bias.copy_(torch.randn(4, generator=generator))
    x = torch.randn(1, 3, 8, 8, generator=generator)
    with torch.no_grad():
        y = conv(x)
        shape = (1, -1, 1, 1)
        expected = (y - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
        expected = expected * bn.weight.view(shape) + bn.bias.view(shape)
        fold_conv_batchnorm(conv, bn)
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


class _ConvThenAdd(nn.Sequential):
    """A Sequential whose forward puts something between its convolution and its BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[1](self[0](x) + 1.0)


def test_only_structural_pairs_are_folded():
    model = nn.Sequential(
        _ConvThenAdd(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)),  # overridden forward: not a pair
        nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.BatchNorm2d(3)),  # not adjacent: not a pair
        nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)),  # batch statistics
        nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)),
    ).eval()
    report = fold_batchnorm(model)
    assert (report.folded, report.left) == (1, 3)
    assert isinstance(model[3][1], nn.Identity)


def test_folding_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
