"""CPFPN neck: reference key compatibility, top-down numerics, output shapes, init, output dtype."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from streampetr_plugin.models.backbones.contract import ShapeSpec
from streampetr_plugin.models.necks.cp_fpn import CPFPN, CPFPNParams

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize(
    "json_name, in_channels, parameter_count",
    [
        ("reference_state_dict_vov_800.json", [768, 1024], 1_049_344),
        ("reference_state_dict_r50_704.json", [1024, 2048], 1_377_024),
    ],
)
def test_state_dict_equals_reference_img_neck(json_name, in_channels, parameter_count):
    entries = json.loads((FIXTURES / json_name).read_text())["state_dict"]
    reference = {k[len("img_neck."):]: v["shape"] for k, v in entries.items() if k.startswith("img_neck.")}
    with torch.device("meta"):
        neck = CPFPN(CPFPNParams(), in_channels=in_channels)
    assert {k: list(v.shape) for k, v in neck.state_dict().items()} == reference
    assert all(p.requires_grad for p in neck.parameters())
    assert sum(p.numel() for p in neck.parameters()) == parameter_count


def _nearest(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest-neighbour resize by explicit source indices floor(i * in / out)."""
    rows = [(i * x.shape[-2]) // height for i in range(height)]
    cols = [(j * x.shape[-1]) // width for j in range(width)]
    return x[..., rows, :][..., cols]


def test_forward_matches_hand_written_top_down_path():
    torch.manual_seed(0)
    neck = CPFPN(CPFPNParams(out_channels=8, num_outs=3), in_channels=[6, 10, 12]).eval()
    with torch.no_grad():
        for parameter in neck.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)  # non-zero biases too
    # sizes that are not exact halves exercise nearest resizing to the finer level's size
    inputs = [torch.randn(2, 6, 9, 21), torch.randn(2, 10, 5, 11), torch.randn(2, 12, 3, 6)]
    with torch.no_grad():
        outputs = neck(inputs)
        state = neck.state_dict()
        lateral = [F.conv2d(x, state[f"lateral_convs.{i}.conv.weight"], state[f"lateral_convs.{i}.conv.bias"])
                   for i, x in enumerate(inputs)]
        level2 = lateral[2]
        level1 = lateral[1] + _nearest(level2, 5, 11)
        level0 = F.conv2d(lateral[0] + _nearest(level1, 9, 21), state["fpn_convs.0.conv.weight"],
                          state["fpn_convs.0.conv.bias"], padding=1)
    assert len(outputs) == 3 and len(neck.fpn_convs) == 1
    torch.testing.assert_close(outputs[0], level0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[1], level1, rtol=1e-5, atol=1e-5)  # bare lateral, no 3x3 conv
    torch.testing.assert_close(outputs[2], level2, rtol=1e-5, atol=1e-5)


def test_extra_levels_subsample_the_last_output_and_output_shape_declares_them():
    torch.manual_seed(0)
    neck = CPFPN(CPFPNParams(out_channels=6, num_outs=4), in_channels=[4, 8]).eval()
    backbone_shape = {"stage4": ShapeSpec(channels=4, stride=16), "stage5": ShapeSpec(channels=8, stride=32)}
    declared = neck.output_shape(backbone_shape)
    assert declared == [ShapeSpec(6, 16), ShapeSpec(6, 32), ShapeSpec(6, 64), ShapeSpec(6, 128)]
    assert neck.output_shape(list(backbone_shape.values())) == declared
    with torch.no_grad():
        outputs = neck({"stage4": torch.randn(1, 4, 10, 25), "stage5": torch.randn(1, 8, 5, 13)})
    assert [tuple(o.shape) for o in outputs] == [(1, 6, 10, 25), (1, 6, 5, 13), (1, 6, 3, 7), (1, 6, 2, 4)]
    torch.testing.assert_close(outputs[2], F.max_pool2d(outputs[1], 1, stride=2), rtol=0, atol=0)
    torch.testing.assert_close(outputs[3], F.max_pool2d(outputs[2], 1, stride=2), rtol=0, atol=0)


def test_convs_start_xavier_uniform_with_zero_bias():
    torch.manual_seed(0)
    neck = CPFPN(CPFPNParams(), in_channels=[768, 1024])
    for name, module in neck.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert torch.count_nonzero(module.bias) == 0, name
            assert module.weight.abs().max() <= bound, name
            # a uniform distribution on [-a, a] has standard deviation a / sqrt(3)
            assert module.weight.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.02), name


def test_outputs_are_float32_under_autocast():
    neck = CPFPN(CPFPNParams(out_channels=8), in_channels=[4, 8])
    inputs = [torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert neck.lateral_convs[0](inputs[0]).dtype == torch.bfloat16  # autocast is active
        outputs = neck(inputs)
    assert [o.dtype for o in outputs] == [torch.float32, torch.float32]


def test_invalid_configurations_are_rejected():
    with pytest.raises(ValueError):
        CPFPN(CPFPNParams(num_outs=1), in_channels=[4, 8])
    neck = CPFPN(CPFPNParams(out_channels=8), in_channels=[4, 8])
    with pytest.raises(ValueError):
        neck([torch.randn(1, 4, 8, 8)])
    with pytest.raises(ValidationError):
        CPFPNParams(out_channel=256)
    with pytest.raises(ValidationError):
        CPFPNParams(out_channels=0)
    assert CPFPNParams().model_dump() == {"out_channels": 256, "num_outs": 2}
