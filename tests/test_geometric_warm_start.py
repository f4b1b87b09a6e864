"""The geometric warm start: what it trains, what it leaves alone, the trainer's use."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from streampetr_plugin import load_recipe
from streampetr_plugin.host import create_plugin_host
from streampetr_plugin.models.heads.streampetr_head import StreamPETRHead, StreamPETRHeadParams
from streampetr_plugin.training.geometric_warm_start import geometric_warm_start, warm_start_parameters
from streampetr_plugin.training.trainer import train
from tests import trainer_helpers
from tests.test_geometric_alignment import FEAT_H, FEAT_W, PAD_HW, STRIDE, two_cameras


class _FixedFeatureDetector(nn.Module):
    """What the warm start needs of a detector: ``extract_img_feats``, ``pts_bbox_head``, ``stride``."""

    def __init__(self, head: StreamPETRHead, channels: int) -> None:
        super().__init__()
        self.pts_bbox_head = head
        self.stride = STRIDE
        self.norm = nn.BatchNorm2d(channels)  # its running statistics must come back unchanged
        self.features = nn.Parameter(torch.randn(2, channels, FEAT_H, FEAT_W))

    def extract_img_feats(self, img):
        return self.norm(self.features).unsqueeze(0).expand(img.shape[0], -1, -1, -1, -1)


def test_warm_start_focuses_the_attention_and_changes_only_its_parameters():
    torch.manual_seed(0)
    params = StreamPETRHeadParams(
        embed_dims=32, num_query=12, memory_len=16, topk_proposals=6, num_propagated=4, depth_num=30,
        num_layers=2, num_heads=4, feedforward_channels=64, dropout=0.0, with_cp=False,
        pc_range=[-20, -20, -3, 20, 20, 3], position_range=[-25, -25, -5, 25, 25, 5],
    )
    head = StreamPETRHead(params, in_channels=16, num_classes=3)
    detector = _FixedFeatureDetector(head, channels=16).train()
    intrinsics, lidar2img = two_cameras(batch=2)
    batches = [{"img": torch.zeros(2, 2, 3, *PAD_HW), "intrinsics": intrinsics, "lidar2img": lidar2img}]
    trained = {id(p) for p in warm_start_parameters(head)}
    before = {name: p.detach().clone() for name, p in detector.named_parameters()}
    buffers = {name: b.clone() for name, b in detector.named_buffers()}

    result = geometric_warm_start(detector, batches, steps=150, lr=3e-3, num_points=64,
                                  generator=torch.Generator().manual_seed(0))

    assert result.last_loss < result.first_loss
    # At the start the attention is nearly uniform: a 3 x 3 patch of 64 tokens holds about 9 / 64.
    assert result.first_target_attention < 0.25
    assert result.last_target_attention > 0.6
    for name, param in detector.named_parameters():
        assert param.grad is None, name
        changed = not torch.equal(param, before[name])
        assert changed == (id(param) in trained) or "in_proj_bias" in name, name
    for name, buffer in detector.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


def test_a_detector_without_a_streampetr_head_is_refused_by_name():
    detector = nn.Module()
    detector.pts_bbox_head = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="optimization.geometric_warm_start needs a StreamPETR head"):
        geometric_warm_start(detector, [{}], steps=1, lr=1e-3, num_points=4, generator=torch.Generator())


def test_trainer_runs_the_warm_start_before_the_first_iteration(synthetic_nuscenes, tmp_path, caplog):
    overrides = trainer_helpers.demo_overrides(synthetic_nuscenes.root, synthetic_nuscenes.version) + [
        f"runtime.work_dir={tmp_path / 'run'}", "runtime.max_iters=1", "runtime.evaluate_at_end=false",
        "optimization.geometric_warm_start.steps=3",
    ]
    with caplog.at_level(logging.INFO, logger="streampetr_plugin.training"):
        result = train(load_recipe(trainer_helpers.DEMO_RECIPE, overrides), host=create_plugin_host())
    assert result.iteration == 1
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("geometric warm start: 3 steps on 2 frames") for message in messages)
