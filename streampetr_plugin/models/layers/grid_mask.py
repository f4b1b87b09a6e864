"""GridMask augmentation of the input images (reference ``GridMask``, grid_mask.py:69-123)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class GridMaskParams(BaseModel):
    """User-settable options of :class:`GridMask` (defaults: the StreamPETR detector's)."""

    model_config = ConfigDict(extra="forbid")

    use_h: bool = Field(default=True, description="Draw horizontal stripes.")
    use_w: bool = Field(default=True, description="Draw vertical stripes.")
    rotate: int = Field(default=1, ge=1, description="Rotation drawn from [0, rotate) degrees (1: none).")
    offset: bool = Field(default=False, description="Fill masked pixels with U[-1, 1) noise instead of 0.")
    ratio: float = Field(default=0.5, gt=0, le=1, description="Stripe width as a fraction of the period.")
    mode: int = Field(default=1, ge=0, le=1, description="0: stripes are zeroed; 1: only stripes are kept.")
    prob: float = Field(default=0.7, ge=0, le=1, description="Probability of masking a training batch.")


class GridMask(nn.Module):
    """One random grid mask shared by every image and channel of the batch; identity in eval mode.

    Per call (training): with probability ``1 - prob`` nothing happens. Otherwise a period
    ``d ~ U{2..H-1}`` is drawn, stripes of width ``l = min(max(int(d * ratio + 0.5), 1), d - 1)`` start at
    random phases in a (1.5 H, 1.5 W) canvas (rows and/or columns), the canvas is rotated by
    ``randint(rotate)`` degrees (PIL, nearest) and its centre H x W crop multiplies the images (``mode=1``
    inverts it first, keeping the stripes).
    Random numbers come from ``generator`` (the global torch RNG when None). ``params``: the settings.
    """

    def __init__(self, params: GridMaskParams, *, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.use_h = params.use_h
        self.use_w = params.use_w
        self.rotate = params.rotate
        self.offset = params.offset
        self.ratio = params.ratio
        self.mode = params.mode
        self.prob = params.prob
        self.generator = generator

    def _randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=self.generator).item())

    def make_mask(self, height: int, width: int) -> torch.Tensor:
        """Draw one (height, width) float mask of 0 / 1 on the CPU (``mode`` already applied)."""
        canvas_h, canvas_w = int(1.5 * height), int(1.5 * width)
        period = self._randint(2, height)
        stripe = min(max(int(period * self.ratio + 0.5), 1), period - 1)
        start_h = self._randint(0, period)
        start_w = self._randint(0, period)
        keep_rows = torch.ones(canvas_h, dtype=torch.bool)
        keep_cols = torch.ones(canvas_w, dtype=torch.bool)
        if self.use_h:
            keep_rows = ~_in_stripes(canvas_h, period, stripe, start_h)
        if self.use_w:
            keep_cols = ~_in_stripes(canvas_w, period, stripe, start_w)
        canvas = (keep_rows[:, None] & keep_cols[None, :]).to(torch.uint8)  # (1.5 H, 1.5 W)

        angle = self._randint(0, self.rotate)
        if angle:
            canvas = torch.from_numpy(np.asarray(Image.fromarray(canvas.numpy()).rotate(angle)).copy())
        top, left = (canvas_h - height) // 2, (canvas_w - width) // 2
        mask = canvas[top : top + height, left : left + width].float()
        return 1 - mask if self.mode == 1 else mask

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Mask ``images`` (N, C, H, W) (training only); returns the same shape."""
        if not self.training or torch.rand(1, generator=self.generator).item() > self.prob:
            return images
        height, width = images.shape[-2:]
        # Made on the host; uploaded without waiting for the device.
        mask = self.make_mask(height, width).to(device=images.device, dtype=images.dtype, non_blocking=True)
        if not self.offset:
            return images * mask
        noise = 2 * (torch.rand(height, width, generator=self.generator) - 0.5)  # U[-1, 1)
        noise = noise.to(images.device, images.dtype)
        return images * mask + noise * (1 - mask)


def _in_stripes(length: int, period: int, stripe: int, start: int) -> torch.Tensor:
    """(length,) bool: inside one of the ``length // period`` stripes ``[period i + start, + stripe)``."""
    shifted = torch.arange(length) - start
    return (shifted >= 0) & (shifted // period < length // period) & (shifted % period < stripe)
