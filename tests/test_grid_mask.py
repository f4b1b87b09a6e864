"""GridMask: identity when off, and the reference's stripe construction when on."""
import numpy as np
import pytest
import torch
from PIL import Image

from streampetr_plugin.models.layers.grid_mask import GridMask, GridMaskParams


def grid_mask(*, generator=None, **settings) -> GridMask:
    """A GridMask with the reference's settings except ``settings``."""
    return GridMask(GridMaskParams(**settings), generator=generator)


def _reference_mask(height, width, period, start_h, start_w, angle, ratio, use_h, use_w, mode):
    """The reference's loop (grid_mask.py:89-112), given its random draws."""
    canvas_h, canvas_w = int(1.5 * height), int(1.5 * width)
    stripe = min(max(int(period * ratio + 0.5), 1), period - 1)
    mask = np.ones((canvas_h, canvas_w), np.float32)
    if use_h:
        for i in range(canvas_h // period):
            s = period * i + start_h
            mask[s : min(s + stripe, canvas_h), :] *= 0
    if use_w:
        for i in range(canvas_w // period):
            s = period * i + start_w
            mask[:, s : min(s + stripe, canvas_w)] *= 0
    mask = np.asarray(Image.fromarray(np.uint8(mask)).rotate(angle))
    top, left = (canvas_h - height) // 2, (canvas_w - width) // 2
    mask = torch.from_numpy(mask[top : top + height, left : left + width].copy()).float()
    return 1 - mask if mode == 1 else mask


def _draws(seed, height, rotate):
    generator = torch.Generator().manual_seed(seed)
    period = int(torch.randint(2, height, (1,), generator=generator))
    start_h = int(torch.randint(0, period, (1,), generator=generator))
    start_w = int(torch.randint(0, period, (1,), generator=generator))
    angle = int(torch.randint(0, rotate, (1,), generator=generator))
    return period, start_h, start_w, angle


@pytest.mark.parametrize(
    "seed, rotate, use_h, use_w, mode",
    [(0, 1, True, True, 1), (1, 1, True, False, 0), (2, 1, False, True, 1), (3, 40, True, True, 1)],
)
def test_mask_equals_reference_construction(seed, rotate, use_h, use_w, mode):
    height, width = 24, 40
    generator = torch.Generator().manual_seed(seed)
    grid = grid_mask(use_h=use_h, use_w=use_w, rotate=rotate, mode=mode, generator=generator)
    mask = grid.make_mask(height, width)
    period, start_h, start_w, angle = _draws(seed, height, rotate)
    expected = _reference_mask(height, width, period, start_h, start_w, angle, 0.5, use_h, use_w, mode)
    assert mask.shape == (height, width)
    assert torch.equal(mask, expected)
    assert 0 < mask.sum() < height * width


def test_identity_in_eval_and_with_zero_probability():
    images = torch.randn(2, 3, 16, 32)
    grid = grid_mask(prob=1.0).eval()
    assert torch.equal(grid(images), images)
    assert torch.equal(grid_mask(prob=0.0).train()(images), images)


def test_one_mask_for_all_images_and_channels_in_training():
    images = torch.randn(6, 3, 32, 48).abs() + 1.0  # strictly positive, so zeros come from the mask only
    out = grid_mask(prob=1.0, generator=torch.Generator().manual_seed(5)).train()(images)
    mask = out / images
    assert torch.all((mask == 0) | (mask == 1))
    assert torch.equal(mask, mask[:1, :1].expand_as(mask))
    assert 0 < mask.mean() < 1


def test_offset_fills_masked_pixels_with_bounded_noise():
    images = torch.full((1, 1, 32, 48), 5.0)
    out = grid_mask(prob=1.0, offset=True, generator=torch.Generator().manual_seed(7)).train()(images)
    kept = out == 5.0
    assert kept.any() and (~kept).any()
    assert torch.all(out[~kept].abs() <= 1.0)


def test_params_defaults_are_the_reference_detector():
    params = GridMaskParams()
    expected = dict(use_h=True, use_w=True, rotate=1, offset=False, ratio=0.5, mode=1, prob=0.7)
    assert params.model_dump() == expected
    grid = GridMask(params)
    assert {name: getattr(grid, name) for name in expected} == expected
