"""Element losses against values computed by hand (python ``math``) on tiny inputs."""
import math

import pytest
import torch

from streampetr_plugin.models.losses.focal_loss import FocalLoss
from streampetr_plugin.models.losses.gaussian_focal_loss import GaussianFocalLoss
from streampetr_plugin.models.losses.giou_loss import GIoULoss
from streampetr_plugin.models.losses.l1_loss import L1Loss
from streampetr_plugin.models.losses.quality_focal_loss import QualityFocalLoss
from streampetr_plugin.models.losses.reduction import AVG_FACTOR_EPS, weight_reduce_loss

EPS32 = torch.finfo(torch.float32).eps


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _focal_element(logit: float, target: int, gamma: float, alpha: float) -> float:
    p = _sigmoid(logit)
    if target:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def test_avg_factor_adds_float32_epsilon():
    loss = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert weight_reduce_loss(loss, avg_factor=2.0).item() == pytest.approx(6.0 / (2.0 + EPS32), rel=1e-15)
    assert AVG_FACTOR_EPS == EPS32
    assert torch.isfinite(weight_reduce_loss(loss, avg_factor=0.0))
    assert weight_reduce_loss(loss, reduction="sum").item() == 6.0
    assert weight_reduce_loss(loss).item() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        weight_reduce_loss(loss, reduction="sum", avg_factor=1.0)


def test_focal_loss_matches_hand_computation_with_background_label():
    logits = [[0.3, -1.2, 2.0], [-0.5, 0.8, -2.5]]
    labels = [1, 3]  # 3 == num_classes: background, all-zero targets
    expected = sum(
        _focal_element(logits[i][c], int(labels[i] == c), 2.0, 0.25) for i in range(2) for c in range(3)
    )
    loss = FocalLoss(gamma=2.0, alpha=0.25, loss_weight=2.0)(
        torch.tensor(logits, dtype=torch.float64), torch.tensor(labels), avg_factor=1.5
    )
    assert loss.item() == pytest.approx(2.0 * expected / (1.5 + EPS32), rel=1e-12)


def test_focal_loss_sample_weight_zeroes_a_row():
    logits = torch.tensor([[0.3, -1.2], [-0.5, 0.8]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    expected = sum(_focal_element(logits[0, c].item(), int(c == 0), 1.5, 0.4) for c in range(2))
    loss = FocalLoss(gamma=1.5, alpha=0.4, loss_weight=1.0, reduction="sum")(
        logits, labels, weight=torch.tensor([1.0, 0.0], dtype=torch.float64)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_quality_focal_loss_matches_hand_computation():
    logits = [[0.2, -1.0], [1.5, 0.1], [-0.3, 0.4]]
    labels = [0, 2, 1]  # 2 == background
    scores = [0.6, 0.0, 0.9]
    beta = 2.0
    expected = 0.0
    for i in range(3):
        for c in range(2):
            p = _sigmoid(logits[i][c])
            if labels[i] == c:
                s = scores[i]
                bce = -(s * math.log(p) + (1 - s) * math.log(1 - p))
                expected += bce * abs(s - p) ** beta
            else:
                expected += -math.log(1 - p) * p**beta
    loss = QualityFocalLoss(beta=beta, loss_weight=2.0)(
        torch.tensor(logits, dtype=torch.float64),
        (torch.tensor(labels), torch.tensor(scores, dtype=torch.float64)),
        avg_factor=2,
    )
    assert loss.item() == pytest.approx(2.0 * expected / (2 + EPS32), rel=1e-12)


def test_quality_focal_loss_gradient_flows_to_positive_logit():
    logits = torch.tensor([[0.2, -1.0]], requires_grad=True)
    QualityFocalLoss()(logits, (torch.tensor([1]), torch.tensor([0.7]))).backward()
    assert torch.all(logits.grad != 0)


def test_gaussian_focal_loss_matches_hand_computation():
    probs = [0.9, 0.3, 0.05]
    heatmap = [1.0, 0.5, 0.0]
    expected = -math.log(0.9 + 1e-12) * (1 - 0.9) ** 2  # the peak: positive term only (weight (1-1)^4 = 0)
    expected += -math.log(1 - 0.3 + 1e-12) * 0.3**2 * (1 - 0.5) ** 4
    expected += -math.log(1 - 0.05 + 1e-12) * 0.05**2 * 1.0
    loss = GaussianFocalLoss(loss_weight=1.0)(
        torch.tensor(probs, dtype=torch.float64), torch.tensor(heatmap, dtype=torch.float64), avg_factor=1.0
    )
    assert loss.item() == pytest.approx(expected / (1.0 + EPS32), rel=1e-12)


def test_giou_loss_matches_hand_computation():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]], dtype=torch.float64)
    giou_first = 1 / 7 - (9 - 7) / 9  # overlap 1, union 7, enclosing 3x3
    giou_second = 0 - (3 - 2) / 3  # disjoint, union 2, enclosing 3x1
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)  # mean over dims
    loss = GIoULoss(loss_weight=2.0)(pred, target, weight, avg_factor=3)
    expected = 2.0 * ((1 - giou_first) + 0.5 * (1 - giou_second)) / (3 + EPS32)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_giou_loss_with_no_positive_weight_is_a_connected_zero():
    pred = torch.rand(3, 4, requires_grad=True)
    loss = GIoULoss(loss_weight=2.0)(pred, torch.rand(3, 4), torch.zeros(3, 4), avg_factor=0)
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and torch.all(pred.grad == 0)


def test_l1_loss_matches_hand_computation_and_empty_target():
    pred = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float64)
    target = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    weight = torch.tensor([2.0, 1.0], dtype=torch.float64)
    expected = 0.25 * (2 * 1.0 + 1 * 3.0 + 2 * 0.5 + 1 * 3.0) / (4 + EPS32)
    loss = L1Loss(loss_weight=0.25)(pred, target, weight, avg_factor=4)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    empty = L1Loss()(torch.zeros(0, 2, requires_grad=True), torch.zeros(0, 2), avg_factor=1)
    assert empty.item() == 0.0 and empty.requires_grad
