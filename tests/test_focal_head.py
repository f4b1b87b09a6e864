"""The 2D auxiliary head: reference state-dict layout, forward semantics, heatmaps and losses."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from streampetr_plugin.models.heads.focal_head import FocalHead, FocalHeadParams

KEY_LIST = Path(__file__).parent / "fixtures" / "reference_state_dict_r50_704.json"


def _locations(batch_cams, height, width, stride, pad_hw):
    pad_h, pad_w = pad_hw
    xs = (torch.arange(width, dtype=torch.float32) * stride + stride // 2) / pad_w
    ys = (torch.arange(height, dtype=torch.float32) * stride + stride // 2) / pad_h
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).expand(batch_cams, height, width, 2)


def _tiny_head(**kwargs):
    torch.manual_seed(0)
    return FocalHead(FocalHeadParams(embed_dims=32, **kwargs), in_channels=32, num_classes=3, stride=16)


def test_state_dict_matches_reference_keys_and_parameter_count():
    reference = json.loads(KEY_LIST.read_text())["state_dict"]
    prefix = "img_roi_head."
    expected = {k[len(prefix):]: v["shape"] for k, v in reference.items() if k.startswith(prefix)}
    head = FocalHead(FocalHeadParams(), in_channels=256, num_classes=10, stride=16)
    ours = {k: list(v.shape) for k, v in head.state_dict().items()}
    assert ours == expected
    assert sum(p.numel() for p in head.parameters()) == 1_185_553
    assert head.cls.bias.detach().tolist() == pytest.approx([-4.59512] * 10, abs=1e-5)
    assert head.centerness.bias.item() == pytest.approx(-4.59512, abs=1e-5)


def test_forward_shapes_boxes_centres_and_token_ranking():
    head = _tiny_head(train_ratio=0.5, infer_ratio=1.0)
    batch, cams, height, width, stride = 2, 3, 4, 6, 16
    pad_hw = (height * stride, width * stride)
    location = _locations(batch * cams, height, width, stride, pad_hw)
    feats = torch.randn(batch, cams, 32, height, width)
    with torch.no_grad():
        head.ltrb.weight.zero_()
        head.ltrb.bias.fill_(math.log(0.1 / 0.9))  # every side 0.1 of the padded size
    out = head.train()(location, feats)
    tokens = height * width
    assert out["enc_cls_scores"].shape == (batch * cams, tokens, 3)
    assert out["enc_bbox_preds"].shape == (batch * cams, tokens, 4)
    assert out["pred_centers2d"].shape == (batch * cams, tokens, 2)
    assert out["centerness"].shape == (batch * cams, tokens, 1)
    assert out["topk_indexes"].shape == (batch, cams * tokens // 2, 1)

    # Token (row 0, col 0) at (8/96, 8/64): x1, y1 clamp to 0.
    x, y = 8 / 96, 8 / 64
    corners = [max(x - 0.1, 0), max(y - 0.1, 0), x + 0.1, y + 0.1]
    x1, y1, x2, y2 = corners
    expected = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
    assert out["enc_bbox_preds"][0, 0].tolist() == pytest.approx(expected, abs=1e-6)
    # Token (1, 2) is away from the border: a 0.2 x 0.2 box centred on the location.
    inner = out["enc_bbox_preds"][0, width + 2].tolist()
    assert inner == pytest.approx([40 / 96, 24 / 64, 0.2, 0.2], abs=1e-6)

    offset = head.center2d(head.shared_reg(feats.flatten(0, 1)))
    offset = offset.permute(0, 2, 3, 1).reshape(batch * cams, -1, 2)
    loc = location.reshape(batch * cams, -1, 2)
    expected_centres = torch.sigmoid(torch.log(loc / (1 - loc)) + offset)
    assert torch.allclose(out["pred_centers2d"], expected_centres, atol=1e-6)

    score = torch.sigmoid(out["enc_cls_scores"].max(-1).values) * torch.sigmoid(out["centerness"][..., 0])
    score = score.reshape(batch, -1)  # tokens of all cameras of a sample, camera-major
    for b in range(batch):
        chosen = out["topk_indexes"][b, :, 0]
        assert torch.equal(score[b, chosen], score[b].sort(descending=True).values[: chosen.numel()])
    assert head.eval()(location, feats)["topk_indexes"].shape == (batch, cams * tokens, 1)  # infer_ratio 1.0
    hybrid = _tiny_head(use_hybrid_tokens=True).train()
    sampled = hybrid(location, feats)["topk_indexes"].shape[1]  # ratio drawn from [0.2, 1.0)
    assert int(cams * tokens * 0.2) <= sampled <= cams * tokens


def _reference_heatmap(centres, boxes, map_hw):
    """The reference's ``_get_heatmap_single`` + ``draw_heatmap_gaussian`` (numpy Gaussian, stride 16)."""
    heatmap = torch.zeros(map_hw)
    for centre, box in zip(centres, boxes):
        bound = torch.cat([centre - box[:2], box[2:] - centre])
        radius = int(torch.clamp(torch.ceil(bound.min() / 16), min=1.0))
        diameter = 2 * radius + 1
        sigma = diameter / 6
        m = (diameter - 1.0) / 2.0
        yy, xx = np.ogrid[-m : m + 1, -m : m + 1]
        gaussian = np.exp(-(xx * xx + yy * yy) / (2 * sigma * sigma))
        x, y = int(centre[0] / 16), int(centre[1] / 16)
        height, width = map_hw
        left, right = min(x, radius), min(width - x, radius + 1)
        top, bottom = min(y, radius), min(height - y, radius + 1)
        region = heatmap[y - top : y + bottom, x - left : x + right]
        patch = gaussian[radius - top : radius + bottom, radius - left : radius + right]
        patch = torch.from_numpy(patch).float()
        if min(patch.shape) > 0 and min(region.shape) > 0:
            torch.max(region, patch, out=region)
    return heatmap


def test_heatmap_equals_reference_drawing_including_borders_and_overlaps():
    head = _tiny_head()
    centres = torch.tensor([[20.0, 30.0], [100.0, 60.0], [3.0, 60.0], [158.0, 5.0], [110.0, 58.0]])
    boxes = torch.tensor(
        [
            [0.0, 0.0, 60.0, 70.0],
            [40.0, 10.0, 150.0, 100.0],
            [0.0, 40.0, 10.0, 63.0],
            [140.0, 0.0, 159.0, 20.0],
            [90.0, 40.0, 130.0, 63.0],
        ]
    )
    heatmaps = head._heatmaps([centres, centres[:0]], [boxes, boxes[:0]], (64, 160), torch.device("cpu"))
    assert heatmaps.shape == (2, 4 * 10)
    expected = _reference_heatmap(centres, boxes, (4, 10))
    assert torch.allclose(heatmaps[0].reshape(4, 10), expected, rtol=1e-6, atol=0)
    assert torch.equal(heatmaps[0] > 0, expected.flatten() > 0)  # the same support
    assert torch.all(heatmaps[1] == 0)
    assert (heatmaps[0] == 1).sum() == 4  # one peak per object; the 2nd and 5th share cell (6, 3)


def test_loss_keys_gradients_and_image_without_objects():
    head = _tiny_head()
    batch, cams, height, width, stride = 1, 2, 4, 6, 16
    pad_hw = (64, 96)
    location = _locations(batch * cams, height, width, stride, pad_hw)
    feats = torch.randn(batch, cams, 32, height, width)
    preds = head.train()(location, feats)
    gt_boxes = [[torch.tensor([[10.0, 5.0, 40.0, 30.0], [50.0, 20.0, 90.0, 60.0]]), torch.zeros(0, 4)]]
    gt_labels = [[torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)]]
    centres = [[torch.tensor([[25.0, 18.0], [70.0, 40.0]]), torch.zeros(0, 2)]]
    losses = head.loss(preds, gt_boxes, gt_labels, centres, pad_hw)
    names = ["enc_loss_cls", "enc_loss_bbox", "enc_loss_iou", "centers2d_losses", "centerness_losses"]
    assert list(losses) == names
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    for name in ("cls", "centerness", "ltrb", "center2d", "shared_cls.0", "shared_reg.0"):
        assert head.get_submodule(name).weight.grad.abs().sum() > 0

    empty = head.loss(
        {k: v.detach() for k, v in preds.items()},
        [[torch.zeros(0, 4), torch.zeros(0, 4)]],
        [[torch.zeros(0, dtype=torch.long)] * 2],
        [[torch.zeros(0, 2)] * 2],
        pad_hw,
    )
    assert empty["enc_loss_bbox"] == 0 and empty["enc_loss_iou"] == 0 and empty["centers2d_losses"] == 0
    assert empty["enc_loss_cls"] > 0 and empty["centerness_losses"] > 0
