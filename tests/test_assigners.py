"""Hungarian matchers: invariants and a brute-force check of optimality."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from streampetr_plugin.bench.counting import HostSyncCounter
from streampetr_plugin.models.assigners.hungarian_2d import HungarianAssigner2D
from streampetr_plugin.models.assigners.hungarian_3d import HungarianAssigner3D
from streampetr_plugin.models.assigners.match_costs import BBoxL1Cost, FocalLossCost, IoUCost
from streampetr_plugin.models.assigners.solver import solve_matchings

CODE_WEIGHTS = torch.tensor([2.0, 2.0, 1, 1, 1, 1, 1, 1, 1, 1])


def _random_3d_gt(generator, count):
    centres = torch.rand(count, 3, generator=generator) * 20 - 10
    sizes = torch.rand(count, 3, generator=generator) * 4 + 0.5
    yaw = torch.rand(count, 1, generator=generator) * 6 - 3
    velocity = torch.randn(count, 2, generator=generator)
    labels = torch.randint(0, 4, (count,), generator=generator)
    return torch.cat([centres, sizes, yaw, velocity], dim=1), labels


def _random_3d_preds(generator, batch, queries, classes=4):
    logits = torch.randn(batch, queries, classes, generator=generator)
    codes = torch.cat(
        [
            torch.rand(batch, queries, 3, generator=generator) * 20 - 10,
            torch.randn(batch, queries, 3, generator=generator),
            torch.randn(batch, queries, 4, generator=generator),
        ],
        dim=-1,
    )
    return logits, codes


def _pairs(result):
    return {(q, g) for q, g in zip(result.pos_inds.tolist(), result.pos_assigned_gt_inds.tolist())}


def test_focal_loss_cost_matches_formula():
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]], dtype=torch.float64)
    labels = torch.tensor([1, 0, 1])
    cost = FocalLossCost(weight=2.0)(logits, labels)
    assert cost.shape == (2, 3)
    p = torch.sigmoid(logits[1, 0]).item()
    expected = 2.0 * (-math.log(p + 1e-12) * 0.25 * (1 - p) ** 2 + math.log(1 - p + 1e-12) * 0.75 * p**2)
    assert cost[1, 1].item() == pytest.approx(expected, rel=1e-12)


def test_box_l1_and_giou_costs():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.4]], dtype=torch.float64)  # cxcywh
    target = torch.tensor([[0.4, 0.3, 0.6, 0.7]], dtype=torch.float64)  # the same box, xyxy
    assert BBoxL1Cost(weight=5.0, box_format="xywh")(pred, target).item() == pytest.approx(0.0, abs=1e-12)
    assert BBoxL1Cost(weight=1.0, box_format="xyxy")(pred, target + 0.1).item() == pytest.approx(0.4)
    assert IoUCost(weight=2.0)(target, target).item() == pytest.approx(-2.0)


def test_3d_batched_equals_one_by_one():
    generator = torch.Generator().manual_seed(0)
    logits, codes = _random_3d_preds(generator, 3, 12)
    gts = [_random_3d_gt(generator, n) for n in (4, 0, 7)]
    assigner = HungarianAssigner3D()
    batched = assigner.assign_batch(logits, codes, [g for g, _ in gts], [lab for _, lab in gts], CODE_WEIGHTS)
    for b, (boxes, labels) in enumerate(gts):
        single = assigner.assign(logits[b], codes[b], boxes, labels, CODE_WEIGHTS)
        assert torch.equal(batched[b].gt_inds, single.gt_inds)
        assert torch.equal(batched[b].labels, single.labels)
        assert batched[b].num_gts == boxes.size(0)
        assert batched[b].pos_inds.numel() == boxes.size(0)


def test_3d_permuting_ground_truths_permutes_the_assignment():
    generator = torch.Generator().manual_seed(1)
    logits, codes = _random_3d_preds(generator, 1, 15)
    boxes, labels = _random_3d_gt(generator, 6)
    assigner = HungarianAssigner3D()
    base = assigner.assign(logits[0], codes[0], boxes, labels, CODE_WEIGHTS)
    perm = torch.randperm(6, generator=generator)
    permuted = assigner.assign(logits[0], codes[0], boxes[perm], labels[perm], CODE_WEIGHTS)
    # new GT j is old GT perm[j]
    assert {(q, perm[g].item()) for q, g in _pairs(permuted)} == _pairs(base)
    matched = permuted.pos_inds
    assert torch.equal(permuted.labels[matched], labels[perm][permuted.pos_assigned_gt_inds])


def test_3d_empty_ground_truth_gives_all_background():
    generator = torch.Generator().manual_seed(2)
    logits, codes = _random_3d_preds(generator, 1, 9)
    no_labels = torch.zeros(0, dtype=torch.long)
    result = HungarianAssigner3D().assign(logits[0], codes[0], torch.zeros(0, 9), no_labels)
    assert result.num_gts == 0
    assert torch.all(result.gt_inds == 0) and torch.all(result.labels == -1)
    assert result.pos_inds.numel() == 0


def _hand_3d_cost(logit_row, code_row, box, label, weights, with_velo):
    p = 1 / (1 + math.exp(-logit_row[label]))
    focal = -math.log(p + 1e-12) * 0.25 * (1 - p) ** 2 + math.log(1 - p + 1e-12) * 0.75 * p**2
    target = [box[0], box[1], box[2], math.log(box[3]), math.log(box[4]), math.log(box[5])]
    target += [math.sin(box[6]), math.cos(box[6]), box[7], box[8]]
    dims = 10 if with_velo else 8
    l1 = sum(abs(code_row[d] * weights[d] - target[d] * weights[d]) for d in range(dims))
    return 2.0 * focal + 0.25 * l1


@pytest.mark.parametrize("with_velo", [False, True])
def test_3d_matches_brute_force_optimum(with_velo):
    generator = torch.Generator().manual_seed(3)
    logits, codes = _random_3d_preds(generator, 1, 5)
    boxes, labels = _random_3d_gt(generator, 3)
    logits64, codes64 = logits[0].double().tolist(), codes[0].double().tolist()
    weights = CODE_WEIGHTS.tolist()
    cost = [
        [_hand_3d_cost(logits64[q], codes64[q], boxes[g].tolist(), labels[g].item(), weights, with_velo)
         for g in range(3)]
        for q in range(5)
    ]
    best = min(itertools.permutations(range(5), 3), key=lambda qs: sum(cost[q][g] for g, q in enumerate(qs)))
    assigner = HungarianAssigner3D()
    result = assigner.assign(logits[0], codes[0], boxes, labels, CODE_WEIGHTS, with_velo=with_velo)
    assert _pairs(result) == {(q, g) for g, q in enumerate(best)}
    assert torch.equal(result.labels[result.pos_inds], labels[result.pos_assigned_gt_inds])


def _random_2d(generator, images, tokens, classes=3):
    logits = torch.randn(images, tokens, classes, generator=generator)
    boxes = torch.cat(
        [
            torch.rand(images, tokens, 2, generator=generator),
            torch.rand(images, tokens, 2, generator=generator) * 0.5,
        ],
        dim=-1,
    )
    centres = torch.rand(images, tokens, 2, generator=generator)
    return logits, boxes, centres


def _random_2d_gt(generator, count, pad_hw=(64, 96), classes=3):
    h, w = pad_hw
    top_left = torch.rand(count, 2, generator=generator) * torch.tensor([w * 0.6, h * 0.6])
    size = torch.rand(count, 2, generator=generator) * torch.tensor([w * 0.3, h * 0.3]) + 2
    boxes = torch.cat([top_left, top_left + size], dim=1)
    centres = top_left + size * torch.rand(count, 2, generator=generator)
    return boxes, torch.randint(0, classes, (count,), generator=generator), centres


def test_2d_batched_equals_one_by_one_and_empty_image():
    generator = torch.Generator().manual_seed(4)
    logits, boxes, centres = _random_2d(generator, 3, 20)
    gts = [_random_2d_gt(generator, n) for n in (3, 0, 5)]
    assigner = HungarianAssigner2D()
    batched = assigner.assign_batch(
        logits, boxes, centres, [g[0] for g in gts], [g[1] for g in gts], [g[2] for g in gts], (64, 96)
    )
    for i, (gt_boxes, gt_labels, gt_centres) in enumerate(gts):
        single = assigner.assign(logits[i], boxes[i], centres[i], gt_boxes, gt_labels, gt_centres, (64, 96))
        assert torch.equal(batched[i].gt_inds, single.gt_inds)
        assert torch.equal(batched[i].labels, single.labels)
    assert torch.all(batched[1].gt_inds == 0) and torch.all(batched[1].labels == -1)


def test_2d_matches_brute_force_optimum():
    generator = torch.Generator().manual_seed(5)
    logits, boxes, centres = _random_2d(generator, 1, 5)
    gt_boxes, gt_labels, gt_centres = _random_2d_gt(generator, 3)
    h, w = 64, 96

    def hand_cost(q, g):
        p = 1 / (1 + math.exp(-logits[0, q, gt_labels[g]].item()))
        focal = -math.log(p + 1e-12) * 0.25 * (1 - p) ** 2 + math.log(1 - p + 1e-12) * 0.75 * p**2
        cx, cy, bw, bh = boxes[0, q].tolist()
        x1, y1, x2, y2 = gt_boxes[g].tolist()
        target = [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]
        l1 = sum(abs(a - b) for a, b in zip([cx, cy, bw, bh], target))
        px1, py1, px2, py2 = (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h
        inter = max(0.0, min(px2, x2) - max(px1, x1)) * max(0.0, min(py2, y2) - max(py1, y1))
        union = (px2 - px1) * (py2 - py1) + (x2 - x1) * (y2 - y1) - inter
        enclose = (max(px2, x2) - min(px1, x1)) * (max(py2, y2) - min(py1, y1))
        giou = inter / union - (enclose - union) / enclose
        centre_l1 = abs(centres[0, q, 0].item() - gt_centres[g, 0].item() / w)
        centre_l1 += abs(centres[0, q, 1].item() - gt_centres[g, 1].item() / h)
        return 2.0 * focal + 5.0 * l1 - 2.0 * giou + 10.0 * centre_l1

    cost = [[hand_cost(q, g) for g in range(3)] for q in range(5)]
    best = min(itertools.permutations(range(5), 3), key=lambda qs: sum(cost[q][g] for g, q in enumerate(qs)))
    assigner = HungarianAssigner2D()
    result = assigner.assign(logits[0], boxes[0], centres[0], gt_boxes, gt_labels, gt_centres, (h, w))
    assert _pairs(result) == {(q, g) for g, q in enumerate(best)}


def test_one_copy_solves_both_heads_exactly_as_scipy_does_per_image():
    """Every matching of a step (3D layers x samples, 2D images) solved from one host copy gives, sample
    by sample, scipy's assignment of that sample's own costs, NaN / inf clamped as in the reference."""
    generator = torch.Generator().manual_seed(6)
    logits_3d, codes = _random_3d_preds(generator, 4, 12)  # e.g. 2 layers x 2 samples
    gts_3d = [_random_3d_gt(generator, n) for n in (4, 0, 7, 2)]
    problem_3d = HungarianAssigner3D().problem(
        logits_3d, codes, [g for g, _ in gts_3d], [lab for _, lab in gts_3d], CODE_WEIGHTS
    )
    logits_2d, boxes, centres = _random_2d(generator, 3, 20)
    gts_2d = [_random_2d_gt(generator, n) for n in (3, 0, 5)]
    problem_2d = HungarianAssigner2D().problem(
        logits_2d, boxes, centres, [g[0] for g in gts_2d], [g[1] for g in gts_2d], [g[2] for g in gts_2d],
        (64, 96),
    )
    problem_3d.costs[0, 3, 1] = float("nan")
    problem_3d.costs[2, 5, 0] = float("inf")
    problem_2d.costs[2, 7, 4] = -float("inf")

    with HostSyncCounter("cpu").watch() as syncs:
        solved = solve_matchings([problem_3d, problem_2d])
    assert syncs.total == 1

    for problem, results, labels in (
        (problem_3d, solved[0], [lab for _, lab in gts_3d]),
        (problem_2d, solved[1], [g[1] for g in gts_2d]),
    ):
        assert len(results) == len(problem.num_gts)
        for cost, result, sample_labels in zip(problem.costs, results, labels):
            num_gt = len(sample_labels)
            clamped = np.nan_to_num(cost[:, :num_gt].numpy(), nan=100.0, posinf=100.0, neginf=-100.0)
            rows, cols = linear_sum_assignment(clamped)
            assert _pairs(result) == set(zip(rows.tolist(), cols.tolist()))
            assert torch.equal(result.labels[result.pos_inds], sample_labels[result.pos_assigned_gt_inds])
            assert (result.labels >= 0).sum() == num_gt and result.num_gts == num_gt
