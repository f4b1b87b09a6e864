"""bf16 autocast on the CPU (``optimization.amp.cpu: bf16``): the switch, what runs in bf16 and what stays
float32, and two training steps against float32."""
import logging

import torch
from torch import nn

from streampetr_plugin.bench import variants as variants_module
from streampetr_plugin.training import precision as precision_module

from streampetr_plugin.adapters.device import DeviceHandle
from streampetr_plugin.config.schema import AmpConfig
from streampetr_plugin.training.precision import MixedPrecision
from tests.test_detector import tiny_batch, tiny_detector

CPU = DeviceHandle("cpu")


def test_the_cpu_runs_fp32_unless_the_recipe_asks_for_bf16():
    assert MixedPrecision(AmpConfig(), CPU).dtype is None  # amp.dtype (fp16) is for accelerators
    assert MixedPrecision(AmpConfig(enabled=False, cpu="bf16"), CPU).dtype is None
    bf16 = MixedPrecision(AmpConfig(cpu="bf16"), CPU)
    assert bf16.dtype is torch.bfloat16 and bf16.scaler is None  # bf16 keeps fp32's range: no loss scale
    assert bf16.describe() == "bf16 autocast on the backbone and neck"
    with bf16.autocast():
        product = torch.ones(4, 4) @ torch.ones(4, 4)
    assert product.dtype is torch.bfloat16


def test_a_cpu_without_native_bf16_is_warned_and_its_bench_variant_skipped(monkeypatch, caplog):
    # SIMULATION of a CPU without AVX512_BF16 / AMX (this one may have them).
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(variants_module, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger=precision_module.__name__):
        assert MixedPrecision(AmpConfig(cpu="bf16"), CPU).dtype is torch.bfloat16  # as asked, but warned
    assert "no native bf16" in caplog.text and "optimization.amp.cpu=fp32" in caplog.text
    baseline = {"attention": "sdpa", "checkpointing": "off", "amp": "fp32", "channels_last": "off"}
    reason = variants_module.Variant("amp", "bf16").unavailable_reason(CPU, None, baseline, {})
    assert reason == "this CPU has no native bf16 (AVX512_BF16 or AMX)"


def _output_dtypes(module: nn.Module, kinds=(nn.Conv2d, nn.Linear)) -> set:
    """Record the dtype of every convolution's and linear layer's output inside ``module``."""
    seen = set()
    for layer in module.modules():
        if isinstance(layer, kinds):
            layer.register_forward_hook(lambda _layer, _args, out: seen.add(out.dtype))
    return seen


def test_backbone_and_neck_run_in_bf16_the_heads_in_float32():
    model = tiny_detector().train()
    backbone, neck = _output_dtypes(model.img_backbone), _output_dtypes(model.img_neck)
    roi_head, head = _output_dtypes(model.img_roi_head), _output_dtypes(model.pts_bbox_head)
    with MixedPrecision(AmpConfig(cpu="bf16"), CPU).autocast():
        losses = model(tiny_batch()).losses
    assert backbone == {torch.bfloat16} and neck == {torch.bfloat16}
    assert roi_head == {torch.float32} and head == {torch.float32}
    assert all(value.dtype == torch.float32 for value in losses.values() if torch.is_tensor(value))


def test_two_bf16_training_steps_stay_close_to_float32():
    """bf16 keeps 8 significant bits (a relative rounding of 2^-9 per value), so the image features move by
    about a percent; the heads, computing in float32 from them, keep the total loss within 1e-4 of float32's
    and the gradient's direction (cosine above 0.999). Heads in bf16 too (``scope: full``) break both
    bounds on this model (total off by 5e-4 to 8e-4, cosine down to 0.98). Not equal either, or autocast did
    nothing."""
    precisions = {
        "fp32": MixedPrecision(AmpConfig(enabled=False), CPU),
        "bf16": MixedPrecision(AmpConfig(cpu="bf16"), CPU),
    }
    models = {name: tiny_detector().train() for name in precisions}
    for step in range(2):  # the second step reads the streaming memory the first one wrote
        batch = tiny_batch(step)
        results = {}
        for name, precision in precisions.items():
            model = models[name]
            model.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # the same denoising noise in both
            with precision.autocast():
                losses = model(batch).losses
            total = sum(value for key, value in losses.items() if "loss" in key)
            total.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            results[name] = (total.item(), grads)
        (total_fp32, grads_fp32), (total_bf16, grads_bf16) = results["fp32"], results["bf16"]
        assert total_bf16 != total_fp32
        assert abs(total_bf16 - total_fp32) <= 1e-4 * abs(total_fp32), (step, total_fp32, total_bf16)
        cosine = torch.nn.functional.cosine_similarity(grads_fp32.double(), grads_bf16.double(), dim=0).item()
        assert 0.999 < cosine < 1.0, (step, cosine)
