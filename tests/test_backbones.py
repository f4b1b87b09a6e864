"""VoVNet and ResNet backbones: reference key compatibility, shapes, freezing, checkpointing, numerics."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from streampetr_plugin.models.backbones.contract import Backbone, ShapeSpec
from streampetr_plugin.models.backbones.resnet import ResNet, ResNetParams
from streampetr_plugin.models.backbones.vovnet import VOVNET_SPECS, VoVNet, VoVNetParams
from streampetr_plugin.models.necks.cp_fpn import CPFPN, CPFPNParams
from tests import reference_synth as synth

FIXTURES = Path(__file__).parent / "fixtures"
VOV_JSON = FIXTURES / "reference_state_dict_vov_800.json"
R50_JSON = FIXTURES / "reference_state_dict_r50_704.json"


def reference_entries(path: Path, prefix: str) -> Dict[str, dict]:
    """``{key without prefix: {"shape", "kind"}}`` of the reference state dict entries under ``prefix``."""
    entries = json.loads(path.read_text())["state_dict"]
    return {key[len(prefix):]: value for key, value in entries.items() if key.startswith(prefix)}


def entry_kinds(module: nn.Module) -> Dict[str, dict]:
    """The same description of our module: shape and trainable / frozen_param / buffer."""
    parameters = dict(module.named_parameters())
    kinds = {}
    for key, tensor in module.state_dict().items():
        if key not in parameters:
            kind = "buffer"
        else:
            kind = "trainable" if parameters[key].requires_grad else "frozen_param"
        kinds[key] = {"shape": list(tensor.shape), "kind": kind}
    return kinds


def batchnorms(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def randomise_batchnorm_statistics(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters, so that eval-mode BN is not the identity."""
    with torch.no_grad():
        for norm in batchnorms(module):
            norm.running_mean.copy_(0.2 * torch.randn(norm.num_features, generator=generator))
            norm.running_var.copy_(0.5 + torch.rand(norm.num_features, generator=generator))
            norm.weight.copy_(0.8 + 0.4 * torch.rand(norm.num_features, generator=generator))
            norm.bias.copy_(0.2 * torch.randn(norm.num_features, generator=generator))


# ---------------------------------------------------------------------------------------------
# Key compatibility with the reference state dicts
# ---------------------------------------------------------------------------------------------


def test_vovnet99_state_dict_equals_reference_keys_shapes_and_kinds():
    with torch.device("meta"):
        backbone = VoVNet(VoVNetParams())
    assert entry_kinds(backbone) == reference_entries(VOV_JSON, "img_backbone.")
    assert sum(p.numel() for p in backbone.parameters()) == 69_523_520  # spec: V2-99 backbone


def test_resnet50_state_dict_equals_reference_keys_shapes_and_kinds():
    with torch.device("meta"):
        backbone = ResNet(ResNetParams())
    # BN affine parameters are frozen_param in the reference (norm_cfg requires_grad=False).
    assert entry_kinds(backbone) == reference_entries(R50_JSON, "img_backbone.")
    # torchvision resnet50 has 25,557,032 parameters, of which the fc layer holds 2048 * 1000 + 1000.
    assert sum(p.numel() for p in backbone.parameters()) == 25_557_032 - 2_049_000


def test_vovnet_39_and_57_differ_from_99_only_in_blocks_per_stage():
    counts = {}
    for name in ("V-39-eSE", "V-57-eSE", "V-99-eSE"):
        with torch.device("meta"):
            backbone = VoVNet(VoVNetParams(spec_name=name))
        blocks = [len([m for m in getattr(backbone, s).children() if not isinstance(m, nn.MaxPool2d)])
                  for s in ("stage2", "stage3", "stage4", "stage5")]
        counts[name] = tuple(blocks)
        assert backbone.output_shape() == {"stage4": ShapeSpec(768, 16), "stage5": ShapeSpec(1024, 32)}
    assert counts == {"V-39-eSE": (1, 1, 2, 2), "V-57-eSE": (1, 1, 4, 3), "V-99-eSE": (1, 3, 9, 3)}


def test_params_defaults_are_the_recipes_and_reject_typos():
    assert VoVNetParams().model_dump() == {
        "spec_name": "V-99-eSE",
        "out_features": ["stage4", "stage5"],
        "frozen_stages": -1,
        "norm_eval": True,
        "with_cp": True,
    }
    assert ResNetParams().model_dump() == {
        "depth": 50,
        "out_indices": [2, 3],
        "frozen_stages": -1,
        "norm_eval": True,
        "norm_requires_grad": False,
        "with_cp": True,
    }
    with pytest.raises(ValidationError):
        VoVNetParams(spec="V-99-eSE")
    with pytest.raises(ValidationError):
        VoVNetParams(out_features=["stage6"])
    with pytest.raises(ValidationError):
        ResNetParams(out_indices=[4])
    with pytest.raises(ValidationError):
        ResNetParams(depth=34)


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(64, 160), (72, 168)])
def test_vovnet_forward_shapes_match_output_shape(height, width):
    torch.manual_seed(0)
    features = ("stem", "stage2", "stage3", "stage4", "stage5")
    backbone = VoVNet(VoVNetParams(spec_name="V-tiny", out_features=features)).eval()
    assert isinstance(backbone, Backbone)
    with torch.no_grad():
        outputs = backbone(torch.randn(2, 3, height, width))
    declared = backbone.output_shape()
    assert list(outputs) == list(declared) == list(features)
    spec = VOVNET_SPECS["V-tiny"]
    assert [declared[n].channels for n in features] == [spec.stem_channels[2], *spec.stage_out_channels]
    assert [declared[n].stride for n in features] == [4, 4, 8, 16, 32]
    # The stem's stride-2 convs give ceil(n / 2) twice; each 3x3 stride-2 pool with ceil_mode=True
    # gives floor(n / 2) (without ceil_mode it would be floor((n - 1) / 2): 18 -> 8, not 9).
    size = (math.ceil(math.ceil(height / 2) / 2), math.ceil(math.ceil(width / 2) / 2))
    for name, tensor in outputs.items():
        if name in ("stage3", "stage4", "stage5"):
            size = (size[0] // 2, size[1] // 2)
        assert tuple(tensor.shape) == (2, declared[name].channels, *size), name


def test_vovnet_returns_only_requested_features_in_network_order():
    backbone = VoVNet(VoVNetParams(spec_name="V-tiny", out_features=("stage5", "stage3"))).eval()
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 64, 64))
    assert list(outputs) == ["stage3", "stage5"] == list(backbone.output_shape())


def test_resnet_forward_shapes_match_output_shape():
    torch.manual_seed(0)
    backbone = ResNet(ResNetParams(out_indices=(0, 1, 2, 3))).eval()
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 64, 160))
    declared = backbone.output_shape()
    assert list(outputs) == list(declared) == ["res2", "res3", "res4", "res5"]
    assert [(s.channels, s.stride) for s in declared.values()] == [(256, 4), (512, 8), (1024, 16), (2048, 32)]
    for name, tensor in outputs.items():
        assert tuple(tensor.shape) == (1, declared[name].channels, 64 // declared[name].stride,
                                       160 // declared[name].stride)
    resnet101 = ResNet(ResNetParams(depth=101))
    assert resnet101.output_shape() == {"res4": ShapeSpec(1024, 16), "res5": ShapeSpec(2048, 32)}
    assert len(resnet101.layer3) == 23


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------


def _functional_vovnet(state: Dict[str, torch.Tensor], images: torch.Tensor, spec_name: str):
    """VoVNet written from the reference's description with functional ops, reading weights by key."""
    spec = VOVNET_SPECS[spec_name]

    def conv_bn_relu(x, prefix, stride=1):
        weight = state[f"{prefix}/conv.weight"]
        x = F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2)
        x = F.batch_norm(x, state[f"{prefix}/norm.running_mean"], state[f"{prefix}/norm.running_var"],
                         state[f"{prefix}/norm.weight"], state[f"{prefix}/norm.bias"], False, 0.0, 1e-5)
        return torch.relu(x)

    x = conv_bn_relu(images, "stem.stem_1", stride=2)
    x = conv_bn_relu(x, "stem.stem_2")
    x = conv_bn_relu(x, "stem.stem_3", stride=2)
    outputs = {}
    for stage_number in (2, 3, 4, 5):
        if stage_number > 2:
            x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        for block in range(1, spec.blocks_per_stage[stage_number - 2] + 1):
            name = f"OSA{stage_number}_{block}"
            base = f"stage{stage_number}.{name}"
            pieces = [x]
            for layer in range(spec.layers_per_block):
                pieces.append(conv_bn_relu(pieces[-1], f"{base}.layers.{layer}.{name}_{layer}"))
            y = conv_bn_relu(torch.cat(pieces, 1), f"{base}.concat.{name}_concat")
            pooled = y.mean((2, 3), keepdim=True)
            gate = F.conv2d(pooled, state[f"{base}.ese.fc.weight"], state[f"{base}.ese.fc.bias"])
            y = y * torch.clamp(gate + 3.0, 0.0, 6.0) / 6.0
            x = y + x if block > 1 else y
        outputs[f"stage{stage_number}"] = x
    return outputs


def test_vovnet_matches_functional_reimplementation():
    generator = torch.Generator().manual_seed(1)
    backbone = VoVNet(VoVNetParams(spec_name="V-tiny", out_features=("stage3", "stage4", "stage5")))
    randomise_batchnorm_statistics(backbone, generator)
    backbone.eval()
    images = torch.randn(2, 3, 72, 104, generator=generator)
    with torch.no_grad():
        ours = backbone(images)
        expected = _functional_vovnet(backbone.state_dict(), images, "V-tiny")
    for name in ours:
        assert ours[name].abs().max() > 1e-2  # the signal survives to the end
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-5, atol=1e-5)


def _fingerprint(tensor: torch.Tensor) -> dict:
    """The fixture's probe of a tensor: float64 sums and 997 samples at (j * (numel - 1)) // 996."""
    flat = tensor.detach().double().flatten()
    index = (torch.arange(997, dtype=torch.int64) * (flat.numel() - 1)) // 996
    return {"sum": flat.sum().item(), "abs_sum": flat.abs().sum().item(),
            "sq_sum": flat.square().sum().item(), "sample": flat[index]}


def _assert_matches_probe(tensor: torch.Tensor, probe: dict) -> None:
    # Measured on CPU against the reference: samples within 5e-5 (neck.0, max |value| 21),
    # sums within a relative 7e-8. Bands: the fidelity README's "strict" 2e-4 on values; 1e-6 of
    # sum |x| (resp. of sum x^2) on the sums, ~15x the worst measured.
    assert list(tensor.shape) == list(probe["shape"])
    ours = _fingerprint(tensor)
    max_error = (ours["sample"] - probe["sample"].double()).abs().max().item()
    assert max_error <= 2e-4, max_error
    assert abs(ours["sum"] - probe["sum"]) <= 1e-6 * probe["abs_sum"]
    assert abs(ours["abs_sum"] - probe["abs_sum"]) <= 1e-6 * probe["abs_sum"]
    assert abs(ours["sq_sum"] - probe["sq_sum"]) <= 1e-6 * probe["sq_sum"]


def test_resnet50_and_cpfpn_reproduce_reference_probes():
    fixture = torch.load(FIXTURES / "r50_128x352_3frames.pt", weights_only=True)
    shapes = synth.load_key_list(R50_JSON)
    image_part = {k: s for k, s in shapes.items() if k.startswith(("img_backbone.", "img_neck."))}
    weights = synth.make_state_dict(image_part, fixture["constants"])
    for key, (checksum, _) in fixture["weights_checksum"].items():
        if key in weights:
            assert weights[key].double().sum().item() == pytest.approx(checksum, rel=1e-12, abs=1e-12)
    backbone = ResNet(ResNetParams())
    in_channels = [shape.channels for shape in backbone.output_shape().values()]
    neck = CPFPN(CPFPNParams(), in_channels=in_channels)

    def under(prefix: str) -> Dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

    backbone.load_state_dict(under("img_backbone."))
    neck.load_state_dict(under("img_neck."))
    backbone.eval()
    neck.eval()

    images = synth.make_images(fixture["inputs"]["img_salt"][0], (6, 3, 128, 352))
    assert _fingerprint(images)["sum"] == fixture["inputs"]["img_probe"][0]["sum"]
    with torch.no_grad():
        features = backbone(images)
        levels = neck(features)
    probes = fixture["frames"][0]["probes"]
    _assert_matches_probe(features["res4"], probes["backbone.0"])
    _assert_matches_probe(features["res5"], probes["backbone.1"])
    _assert_matches_probe(levels[0], probes["neck.0"])
    _assert_matches_probe(levels[1], probes["neck.1"])


# ---------------------------------------------------------------------------------------------
# Training-mode behaviour: freezing, norm_eval, frozen BN, checkpointing
# ---------------------------------------------------------------------------------------------


def _tiny_resnet(**kwargs) -> ResNet:
    return ResNet(ResNetParams(out_indices=(0, 1, 2, 3), **kwargs))


def _sum_of_outputs(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return sum(feature.square().mean() for feature in backbone(images).values())


@pytest.mark.parametrize(
    "build, frozen_prefixes, trainable_prefixes",
    [
        (lambda: VoVNet(VoVNetParams(spec_name="V-tiny", frozen_stages=2, norm_eval=False,
                        out_features=("stage2", "stage3", "stage4", "stage5"))),
         ("stem.", "stage2.", "stage3."), ("stage4.", "stage5.")),
        (lambda: _tiny_resnet(frozen_stages=1, norm_eval=False, norm_requires_grad=True),
         ("conv1.", "bn1.", "layer1."), ("layer2.", "layer3.", "layer4.")),
    ],
    ids=["vovnet", "resnet"],
)
def test_frozen_stages_stay_frozen_in_training(build, frozen_prefixes, trainable_prefixes):
    torch.manual_seed(0)
    backbone = build()
    backbone.train()
    for name, parameter in backbone.named_parameters():
        assert parameter.requires_grad == (not name.startswith(frozen_prefixes)), name
        assert name.startswith(frozen_prefixes + trainable_prefixes), name
    for name, module in backbone.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            # frozen stages keep BN in eval even though norm_eval is off; the others train
            assert module.training == (not (name + ".").startswith(frozen_prefixes)), name
    frozen_stats = {k: v.clone() for k, v in backbone.state_dict().items()
                    if k.startswith(frozen_prefixes) and "running" in k}
    _sum_of_outputs(backbone, torch.randn(2, 3, 32, 64)).backward()
    for name, parameter in backbone.named_parameters():
        if name.startswith(frozen_prefixes):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for key, value in frozen_stats.items():
        assert torch.equal(backbone.state_dict()[key], value), key


@pytest.mark.parametrize("build", [lambda **kw: VoVNet(VoVNetParams(spec_name="V-tiny", **kw)), _tiny_resnet],
                         ids=["vovnet", "resnet"])
def test_norm_eval_keeps_batchnorm_statistics_fixed_in_training(build):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 64)
    for norm_eval in (True, False):
        backbone = build(norm_eval=norm_eval, with_cp=False).train()
        assert backbone.training
        assert all(norm.training == (not norm_eval) for norm in batchnorms(backbone))
        before = [norm.running_mean.clone() for norm in batchnorms(backbone)]
        with torch.no_grad():
            backbone(images)
        changed = [not torch.equal(b, norm.running_mean) for b, norm in zip(before, batchnorms(backbone))]
        assert all(changed) if not norm_eval else not any(changed)


def test_resnet_batchnorm_affine_frozen_unless_requested():
    frozen = ResNet(ResNetParams())
    assert all(not p.requires_grad for norm in batchnorms(frozen) for p in norm.parameters())
    assert all(m.weight.requires_grad for m in frozen.modules() if isinstance(m, nn.Conv2d))
    trainable = ResNet(ResNetParams(norm_requires_grad=True))
    assert all(p.requires_grad for norm in batchnorms(trainable) for p in norm.parameters())


@pytest.mark.parametrize(
    "build, block_conv",
    [
        (
            lambda cp: VoVNet(VoVNetParams(spec_name="V-tiny", with_cp=cp)),
            lambda m: m.stage4.OSA4_2.layers[0][0],
        ),
        (lambda cp: _tiny_resnet(with_cp=cp), lambda m: m.layer2[1].conv2),
    ],
    ids=["vovnet", "resnet"],
)
def test_with_cp_recomputes_blocks_and_gives_identical_outputs_and_gradients(build, block_conv):
    torch.manual_seed(0)
    plain = build(False).train()
    checkpointed = build(True).train()
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 64)

    results = {}
    for name, backbone in (("plain", plain), ("checkpointed", checkpointed)):
        calls = []
        hook = block_conv(backbone).register_forward_hook(lambda *_, calls=calls: calls.append(1))
        inputs = images.clone().requires_grad_(True)
        outputs = backbone(inputs)
        sum(feature.square().mean() for feature in outputs.values()).backward()
        hook.remove()
        grads = {k: p.grad.clone() for k, p in backbone.named_parameters() if p.grad is not None}
        results[name] = (outputs, grads, inputs.grad, len(calls))

    (out_a, grads_a, input_grad_a, calls_a), (out_b, grads_b, input_grad_b, calls_b) = results.values()
    assert (calls_a, calls_b) == (1, 2)  # checkpointing re-runs the block in backward
    for key in out_a:
        torch.testing.assert_close(out_b[key], out_a[key], rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    assert len(grads_a) == len([p for p in plain.parameters() if p.requires_grad])
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(input_grad_b, input_grad_a, rtol=1e-6, atol=1e-7)

    with torch.no_grad():  # no recomputation, and identical results, in eval mode
        plain.eval()
        checkpointed.eval()
        for key, value in plain(images).items():
            torch.testing.assert_close(checkpointed(images)[key], value, rtol=0, atol=0)
