"""Reference-checkpoint loading: layouts, prefixes, shared branches, reporting, unsafe files."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
import torch
from torch import nn

from streampetr_plugin.interop.checkpoint import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    load_reference_checkpoint,
    read_checkpoint_state_dict,
)
from streampetr_plugin.models.backbones.resnet import ResNet, ResNetParams
from streampetr_plugin.models.backbones.vovnet import VoVNet, VoVNetParams
from streampetr_plugin.models.necks.cp_fpn import CPFPN, CPFPNParams
from tests import reference_synth as synth

FIXTURES = Path(__file__).parent / "fixtures"


class ImageFeatureModel(nn.Module):
    """The detector's image part, under the reference's attribute names."""

    def __init__(self, backbone: nn.Module, neck: nn.Module) -> None:
        super().__init__()
        self.img_backbone = backbone
        self.img_neck = neck


def tiny_model(seed: int) -> ImageFeatureModel:
    torch.manual_seed(seed)
    backbone = VoVNet(VoVNetParams(spec_name="V-tiny"))
    in_channels = [s.channels for s in backbone.output_shape().values()]
    neck = CPFPN(CPFPNParams(out_channels=8), in_channels=in_channels)
    return ImageFeatureModel(backbone, neck)


def assert_state_equal(model: nn.Module, expected: Dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_reference_r50_key_list_in_mmcv_layout_loads_exactly(tmp_path):
    shapes = synth.load_key_list(FIXTURES / "reference_state_dict_r50_704.json")
    shapes = {k: s for k, s in shapes.items() if k.startswith(("img_backbone.", "img_neck."))}
    reference = synth.make_state_dict(shapes, {})
    path = tmp_path / "stream_petr_r50.pth"
    torch.save(
        {
            "meta": {"mmcv_version": "1.7.2", "CLASSES": ("car", "truck"), "config": "model = dict()",
                     "epoch": 24, "iter": 42192, "hook_msgs": {"last_ckpt": "iter_42192.pth"}},
            "state_dict": reference,
            "optimizer": {"state": {}, "param_groups": [{"lr": 4e-4, "params": [0, 1]}]},
        },
        path,
    )
    model = ImageFeatureModel(ResNet(ResNetParams()), CPFPN(CPFPNParams(), in_channels=[1024, 2048]))
    report = load_reference_checkpoint(model, path, strict=True)
    assert report.is_exact and report.prefix_map == {}
    assert sorted(report.loaded) == sorted(shapes) and len(report.loaded) == 324
    assert_state_equal(model, reference)


def test_plain_and_ddp_prefixed_state_dicts_load(tmp_path):
    source = tiny_model(seed=1).state_dict()
    for name, content in (("plain", source), ("ddp", {"module." + k: v for k, v in source.items()})):
        path = tmp_path / f"{name}.pth"
        torch.save(content, path)
        target = tiny_model(seed=2)
        fpn_weight = source["img_neck.fpn_convs.0.conv.weight"]
        assert not torch.equal(target.img_neck.fpn_convs[0].conv.weight, fpn_weight)
        report = load_reference_checkpoint(target, path)
        assert report.is_exact, report.summary()
        assert_state_equal(target, source)


def test_backbone_only_file_with_extra_head_keys_reports_missing_and_unexpected_by_name(tmp_path):
    # The layout of fcos3d_vovnet_imgbackbone-remapped.pth: img_backbone.* plus FCOS3D's bbox_head.*.
    source = {k: v for k, v in tiny_model(seed=1).state_dict().items() if k.startswith("img_backbone.")}
    source["bbox_head.cls_convs.0.conv.weight"] = torch.ones(4, 4, 3, 3)
    path = tmp_path / "fcos3d_vovnet_imgbackbone-remapped.pth"
    torch.save(source, path)
    target = tiny_model(seed=2)
    neck_before = {k: v.clone() for k, v in target.img_neck.state_dict().items()}
    report = load_reference_checkpoint(target, path)
    assert report.unexpected == ["bbox_head.cls_convs.0.conv.weight"]
    assert report.missing == ["img_neck." + k for k in neck_before]
    assert sorted(report.loaded) == sorted(k for k in source if k.startswith("img_backbone."))
    for key, value in source.items():
        if key.startswith("img_backbone."):
            assert torch.equal(target.state_dict()[key], value), key
    for key, value in neck_before.items():  # untouched
        assert torch.equal(target.img_neck.state_dict()[key], value), key
    summary = report.summary()
    assert "unexpected (1): bbox_head.cls_convs.0.conv.weight" in summary
    assert f"missing ({len(neck_before)}): img_neck.lateral_convs.0.conv.weight" in summary


def test_bare_backbone_keys_are_mapped_under_img_backbone(tmp_path):
    # torchvision-style file: backbone keys without prefix, plus the classifier.
    torch.manual_seed(3)
    source = ResNet(ResNetParams(norm_requires_grad=True)).state_dict()
    source["fc.weight"] = torch.zeros(1000, 2048)
    source["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet50.pth"
    torch.save(source, path)
    model = ImageFeatureModel(ResNet(ResNetParams()), CPFPN(CPFPNParams(), in_channels=[1024, 2048]))
    report = load_reference_checkpoint(model, path)
    assert report.prefix_map == {"": "img_backbone."}
    assert report.unexpected == ["img_backbone.fc.weight", "img_backbone.fc.bias"]
    assert all(key.startswith("img_neck.") for key in report.missing) and len(report.missing) == 6
    assert torch.equal(model.img_backbone.layer3[5].conv2.weight, source["layer3.5.conv2.weight"])


def test_explicit_prefix_map_renames_keys(tmp_path):
    source = tiny_model(seed=1).state_dict()
    renamed = {k.replace("img_backbone.", "backbone.").replace("img_neck.", "neck."): v
               for k, v in source.items()}
    path = tmp_path / "renamed.pth"
    torch.save({"state_dict": renamed}, path)
    target = tiny_model(seed=2)
    prefix_map = {"backbone.": "img_backbone.", "neck.": "img_neck."}
    report = load_reference_checkpoint(target, path, prefix_map=prefix_map)
    assert report.is_exact, report.summary()
    assert_state_equal(target, source)


def test_shape_mismatch_is_reported_and_skipped_and_strict_refuses_to_load(tmp_path):
    source = tiny_model(seed=1).state_dict()
    key = "img_neck.fpn_convs.0.conv.weight"
    source[key] = torch.zeros(8, 8, 1, 1)
    del source["img_neck.fpn_convs.0.conv.bias"]
    path = tmp_path / "mismatch.pth"
    torch.save(source, path)

    strict_target = tiny_model(seed=2)
    before = {k: v.clone() for k, v in strict_target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as raised:
        load_reference_checkpoint(strict_target, path, strict=True)
    assert raised.value.report.shape_mismatch == [(key, (8, 8, 1, 1), (8, 8, 3, 3))]
    assert "img_neck.fpn_convs.0.conv.bias" in str(raised.value)
    assert_state_equal(strict_target, before)  # nothing loaded

    target = tiny_model(seed=2)
    old_weight = target.img_neck.fpn_convs[0].conv.weight.detach().clone()
    report = load_reference_checkpoint(target, path)
    assert report.shape_mismatch == [(key, (8, 8, 1, 1), (8, 8, 3, 3))]
    assert report.missing == ["img_neck.fpn_convs.0.conv.bias"] and not report.unexpected
    assert torch.equal(target.img_neck.fpn_convs[0].conv.weight, old_weight)
    lateral_weight = source["img_neck.lateral_convs.1.conv.weight"]
    assert torch.equal(target.img_neck.lateral_convs[1].conv.weight, lateral_weight)


def _branch(kind: str) -> nn.Sequential:
    if kind == "cls":  # Linear, LayerNorm, ReLU, Linear, LayerNorm, ReLU, Linear (indices 0..6)
        return nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256), nn.ReLU(), nn.Linear(256, 256),
                             nn.LayerNorm(256), nn.ReLU(), nn.Linear(256, 10))
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


class BranchHead(nn.Module):
    """The reference head's six per-layer branches: one shared module each, or six separate ones."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        if shared:
            cls_branch, reg_branch = _branch("cls"), _branch("reg")
            self.cls_branches = nn.ModuleList([cls_branch] * 6)
            self.reg_branches = nn.ModuleList([reg_branch] * 6)
        else:
            self.cls_branches = nn.ModuleList(_branch("cls") for _ in range(6))
            self.reg_branches = nn.ModuleList(_branch("reg") for _ in range(6))


class HeadModel(nn.Module):
    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.pts_bbox_head = BranchHead(shared)


def _reference_branch_state() -> Dict[str, torch.Tensor]:
    shapes = synth.load_key_list(FIXTURES / "reference_state_dict_r50_704.json")
    branch_keys = {k: s for k, s in shapes.items() if k.startswith(("pts_bbox_head.cls_branches.",
                                                                     "pts_bbox_head.reg_branches."))}
    assert len(branch_keys) == 6 * (10 + 6)
    return synth.make_state_dict(branch_keys, {})


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
def test_duplicate_branch_copies_load_into_shared_or_separate_branches(tmp_path, shared):
    state = _reference_branch_state()
    path = tmp_path / "branches.pth"
    torch.save({"state_dict": state, "meta": {}}, path)
    model = HeadModel(shared)
    report = load_reference_checkpoint(model, path, strict=True)
    assert report.is_exact and len(report.loaded) == 96
    assert_state_equal(model, state)


def test_disagreeing_copies_of_a_shared_branch_are_reported(tmp_path):
    state = _reference_branch_state()
    state["pts_bbox_head.cls_branches.3.6.bias"] = state["pts_bbox_head.cls_branches.3.6.bias"] + 1.0
    path = tmp_path / "branches.pth"
    torch.save(state, path)
    report = load_reference_checkpoint(HeadModel(shared=True), path)
    assert report.alias_conflicts == [tuple(f"pts_bbox_head.cls_branches.{i}.6.bias" for i in range(6))]
    assert not report.is_exact and "different values" in report.summary()
    separate = load_reference_checkpoint(HeadModel(shared=False), path)  # six modules: every copy fits
    assert separate.is_exact


EXECUTED: List[str] = []


def _record_execution(note: str) -> str:
    EXECUTED.append(note)
    return note


class CodeCarryingObject:
    """Pickles as a call to ``_record_execution``: loading it with full unpickling would run code."""

    def __reduce__(self):
        return (_record_execution, ("unpickled",))


def test_file_needing_code_to_unpickle_is_refused_with_its_name(tmp_path):
    path = tmp_path / "suspicious_checkpoint.pth"
    torch.save({"state_dict": tiny_model(seed=1).state_dict(), "meta": {"hook": CodeCarryingObject()}}, path)
    with pytest.raises(UnsafeCheckpointError) as raised:
        load_reference_checkpoint(tiny_model(seed=2), path)
    message = str(raised.value)
    assert str(path) in message and "_record_execution" in message
    assert EXECUTED == []


def test_file_without_a_state_dict_is_rejected(tmp_path):
    path = tmp_path / "trainer_state.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, path)
    with pytest.raises(ValueError, match="holds no state dict"):
        read_checkpoint_state_dict(path)
