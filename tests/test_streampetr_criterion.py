"""The 3D criterion: normalisers, the denoising branch, key names and edge cases, checked by hand."""
import math

import pytest
import torch

from streampetr_plugin.models.losses.streampetr_criterion import (
    StreamPETRCriterion,
    StreamPETRCriterionParams,
)

EPS32 = torch.finfo(torch.float32).eps
CODE_WEIGHTS = torch.tensor([2.0, 2.0, 1, 1, 1, 1, 1, 1, 1, 1], dtype=torch.float64)
NUM_CLASSES = 3


def _focal_sum(logits, labels):
    """Sum of sigmoid focal terms (gamma 2, alpha 0.25) over rows with integer labels (NUM_CLASSES = bg)."""
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        for c, x in enumerate(row):
            p = 1 / (1 + math.exp(-x))
            if c == label:
                total += -0.25 * (1 - p) ** 2 * math.log(p)
            else:
                total += -0.75 * p**2 * math.log(1 - p)
    return total


def _code(box):
    x, y, z, dx, dy, dz, yaw, vx, vy = box.tolist()
    return [x, y, z, math.log(dx), math.log(dy), math.log(dz), math.sin(yaw), math.cos(yaw), vx, vy]


def _weighted_l1(pred_rows, target_boxes):
    return sum(
        w * abs(p - t)
        for pred, box in zip(pred_rows, target_boxes)
        for p, t, w in zip(pred.tolist(), _code(box), CODE_WEIGHTS.tolist())
    )


def _gt(generator, count):
    boxes = torch.cat(
        [
            torch.rand(count, 3, generator=generator, dtype=torch.float64) * 10,
            torch.rand(count, 3, generator=generator, dtype=torch.float64) + 0.5,
            torch.rand(count, 3, generator=generator, dtype=torch.float64),
        ],
        dim=1,
    )
    return boxes, torch.randint(0, NUM_CLASSES, (count,), generator=generator)


def _preds(generator, layers, batch, queries, requires_grad=False):
    cls = torch.randn(layers, batch, queries, NUM_CLASSES, generator=generator, dtype=torch.float64)
    box = torch.randn(layers, batch, queries, 10, generator=generator, dtype=torch.float64)
    return cls.requires_grad_(requires_grad), box.requires_grad_(requires_grad)


def _criterion(with_dn=True, dn_weight=1.0, split=0.75):
    return StreamPETRCriterion(
        StreamPETRCriterionParams(), num_classes=NUM_CLASSES, match_with_velo=False, with_dn=with_dn,
        dn_weight=dn_weight, split=split,
    )


def test_matching_losses_use_the_matched_count_as_normaliser():
    generator = torch.Generator().manual_seed(0)
    cls, box = _preds(generator, 2, 2, 5)
    gts = [_gt(generator, 2), _gt(generator, 3)]
    criterion = _criterion()
    boxes, labels = [g[0] for g in gts], [g[1] for g in gts]
    losses = criterion(cls, box, None, boxes, labels, CODE_WEIGHTS, CODE_WEIGHTS)
    assignments = criterion.match(cls, box, boxes, labels, CODE_WEIGHTS)
    num_pos = 5
    for layer, prefix in ((0, "d0."), (1, "")):
        all_labels, matched_preds, matched_boxes = [], [], []
        for b, result in enumerate(assignments[layer]):
            all_labels.append(torch.where(result.labels < 0, NUM_CLASSES, result.labels))
            matched_preds += list(box[layer, b, result.pos_inds].detach())
            matched_boxes += list(boxes[b][result.pos_assigned_gt_inds])
        focal = _focal_sum(cls[layer].reshape(-1, NUM_CLASSES), torch.cat(all_labels))
        expected_cls = 2.0 * focal / (num_pos + EPS32)
        expected_bbox = 0.25 * _weighted_l1(matched_preds, matched_boxes) / (num_pos + EPS32)
        assert losses[f"{prefix}loss_cls"].item() == pytest.approx(expected_cls, rel=1e-12)
        assert losses[f"{prefix}loss_bbox"].item() == pytest.approx(expected_bbox, rel=1e-12)


def test_dn_branch_without_dn_queries_reports_detached_copies():
    generator = torch.Generator().manual_seed(1)
    cls, box = _preds(generator, 3, 1, 6, requires_grad=True)
    boxes, labels = _gt(generator, 2)
    losses = _criterion()(cls, box, None, [boxes], [labels], CODE_WEIGHTS, CODE_WEIGHTS)
    assert len(losses) == 12
    for name in ("loss_cls", "loss_bbox", "d0.loss_cls", "d1.loss_bbox"):
        dn_name = name.replace("loss", "dn_loss")
        assert losses[dn_name].item() == losses[name].item()
        assert losses[name].requires_grad and not losses[dn_name].requires_grad
    without_dn = _criterion(with_dn=False)(cls, box, None, [boxes], [labels], CODE_WEIGHTS, CODE_WEIGHTS)
    assert list(without_dn) == [
        "loss_cls", "loss_bbox", "d0.loss_cls", "d0.loss_bbox", "d1.loss_cls", "d1.loss_bbox"
    ]


def _dn_mask_dict(generator, gts, groups, layers):
    """The reference ``prepare_for_dn`` layout (group-major copies), built by hand."""
    counts = [boxes.size(0) for boxes, _ in gts]
    single_pad = max(counts)
    total = sum(counts)
    boxes = torch.cat([b for b, _ in gts])
    labels = torch.cat([lab for _, lab in gts]).repeat(groups)
    labels[torch.rand(labels.shape, generator=generator) < 0.4] = NUM_CLASSES  # relabelled copies
    within = torch.cat([torch.arange(n) for n in counts])
    pad = single_pad * groups
    return {
        "known_indice": torch.arange(total).repeat(groups),
        "batch_idx": torch.cat([torch.full((n,), b) for b, n in enumerate(counts)]),
        "map_known_indice": torch.cat([within + single_pad * g for g in range(groups)]),
        "known_lbs_bboxes": (labels, boxes.repeat(groups, 1)),
        "know_idx": [torch.ones(n) for n in counts],
        "pad_size": pad,
        "output_known_lbs_bboxes": (
            torch.randn(layers, len(gts), pad, NUM_CLASSES, generator=generator, dtype=torch.float64),
            torch.randn(layers, len(gts), pad, 10, generator=generator, dtype=torch.float64),
        ),
    }


def test_denoising_losses_match_hand_computation():
    generator = torch.Generator().manual_seed(2)
    gts = [_gt(generator, 3), _gt(generator, 1)]
    groups, layers = 4, 2
    dn = _dn_mask_dict(generator, gts, groups, layers)
    cls, box = _preds(generator, layers, 2, 6)
    losses = _criterion(dn_weight=0.5, split=0.75)(
        cls, box, dn, [g[0] for g in gts], [g[1] for g in gts], CODE_WEIGHTS, CODE_WEIGHTS
    )
    out_cls, out_box = dn["output_known_lbs_bboxes"]
    known_labels, known_boxes = dn["known_lbs_bboxes"]
    num_dn = known_labels.numel()  # 4 groups x 4 GT
    copies = enumerate(dn["known_indice"].tolist())  # (copy k, GT i)
    rows = [(dn["batch_idx"][i].item(), dn["map_known_indice"][k].item()) for k, i in copies]
    cls_factor = max(num_dn * 3.14159 / 6 * 0.75**3, 1)
    for layer, prefix in ((0, "d0."), (1, "")):
        layer_cls = torch.stack([out_cls[layer, b, q] for b, q in rows])
        layer_box = [out_box[layer, b, q] for b, q in rows]
        expected_cls = 0.5 * 2.0 * _focal_sum(layer_cls, known_labels) / (cls_factor + EPS32)
        expected_bbox = 0.5 * 0.25 * _weighted_l1(layer_box, list(known_boxes)) / (num_dn + EPS32)
        assert losses[f"{prefix}dn_loss_cls"].item() == pytest.approx(expected_cls, rel=1e-12)
        assert losses[f"{prefix}dn_loss_bbox"].item() == pytest.approx(expected_bbox, rel=1e-12)
    assert list(losses) == [
        "loss_cls", "loss_bbox", "d0.loss_cls", "d0.loss_bbox",
        "dn_loss_cls", "dn_loss_bbox", "d0.dn_loss_cls", "d0.dn_loss_bbox",
    ]


def test_zero_size_box_is_left_out_of_the_l1_loss():
    generator = torch.Generator().manual_seed(3)
    cls, box = _preds(generator, 1, 1, 4, requires_grad=True)
    boxes, labels = _gt(generator, 2)
    criterion = _criterion(with_dn=False)
    reference = criterion(cls, box, None, [boxes[:1]], [labels[:1]], CODE_WEIGHTS, CODE_WEIGHTS)
    degenerate = boxes.clone()
    degenerate[1, 3] = 0.0  # log(0) = -inf: the reference drops this row
    losses = criterion(cls, box, None, [degenerate], [labels], CODE_WEIGHTS, CODE_WEIGHTS)
    assert torch.isfinite(losses["loss_bbox"])
    result = criterion.match(cls, box, [degenerate], [labels], CODE_WEIGHTS)[0][0]
    kept = result.pos_inds[result.pos_assigned_gt_inds == 0]
    expected = 0.25 * _weighted_l1(list(box[0, 0, kept].detach()), [boxes[0]]) / (2 + EPS32)
    assert losses["loss_bbox"].item() == pytest.approx(expected, rel=1e-12)
    losses["loss_bbox"].backward()
    dropped = result.pos_inds[result.pos_assigned_gt_inds == 1]
    assert torch.all(box.grad[0, 0, dropped] == 0)
    assert reference["loss_bbox"].item() > 0

    # A non-finite prediction on a dropped row does not leak into the loss (the reference drops the row).
    preds = torch.tensor([[1.0] * 10, [float("nan")] * 10], dtype=torch.float64)
    targets = torch.tensor([[0.0] * 10, [float("-inf")] + [0.0] * 9], dtype=torch.float64)
    masked = criterion._masked_l1(preds, targets, CODE_WEIGHTS, avg_factor=1.0)
    assert masked.item() == pytest.approx(0.25 * 12 / (1 + EPS32), rel=1e-12)  # row 0: 2 + 2 + 8 x 1


def test_batch_without_ground_truth_gives_zero_box_loss():
    generator = torch.Generator().manual_seed(4)
    cls, box = _preds(generator, 2, 2, 4, requires_grad=True)
    empty = [torch.zeros(0, 9, dtype=torch.float64)] * 2
    no_labels = [torch.zeros(0, dtype=torch.long)] * 2
    losses = _criterion()(cls, box, None, empty, no_labels, CODE_WEIGHTS, CODE_WEIGHTS)
    assert losses["loss_bbox"].item() == 0.0
    all_background = torch.full((8,), NUM_CLASSES)
    focal = _focal_sum(cls[1].reshape(-1, NUM_CLASSES), all_background)
    expected = 2.0 * focal / (1 + EPS32)  # normaliser max(0, 1)
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-12)
    (losses["loss_cls"] + losses["loss_bbox"]).backward()
    assert torch.isfinite(cls.grad).all()
