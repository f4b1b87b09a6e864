"""Stateless helpers with mmdet / mmcv semantics."""
import math

import pytest
import torch

from streampetr_plugin.models.layers.functional import (
    bias_init_with_prob,
    clip_sigmoid,
    inverse_sigmoid,
    mean_count_over_ranks,
    reduce_mean,
)


def test_inverse_sigmoid_clamps_to_unit_range_before_eps():
    x = torch.tensor([-0.5, 0.0, 0.25, 1.0, 1.7], dtype=torch.float64)
    out = inverse_sigmoid(x)
    limit = math.log(1e-5 / (1 - 1e-5))
    assert out.tolist() == pytest.approx([limit, limit, math.log(0.25 / 0.75), -limit, -limit])
    clamped = inverse_sigmoid(torch.tensor([1.0]), eps=1e-3).item()
    assert clamped == pytest.approx(math.log(1 / 1e-3), rel=1e-6)


def test_reduce_mean_is_identity_without_process_group():
    t = torch.tensor([3.0])
    assert reduce_mean(t) is t
    assert mean_count_over_ranks(0, torch.device("cpu")) == 1.0
    assert mean_count_over_ranks(7, torch.device("cpu")) == 7.0


def test_bias_init_with_prob_gives_the_prior():
    bias = bias_init_with_prob(0.01)
    assert bias == pytest.approx(-4.59511985, abs=1e-8)
    assert torch.sigmoid(torch.tensor(bias, dtype=torch.float64)).item() == pytest.approx(0.01)


def test_clip_sigmoid_clamps_and_leaves_input_untouched():
    x = torch.tensor([-20.0, 0.0, 20.0])
    out = clip_sigmoid(x)
    assert out.tolist() == pytest.approx([1e-4, 0.5, 1 - 1e-4])
    assert x.tolist() == [-20.0, 0.0, 20.0]
