"""Positional encodings and feature modulation layers of the StreamPETR head.

* :func:`pos2posemb3d` - sine encoding of normalised 3D points, axes concatenated (y, x, z);
* :func:`pos2posemb1d` - the same scheme for one scalar (memory ages);
* :func:`nerf_positional_encoding` - NeRF-style sin/cos octaves of the 15-number ego-motion codes;
* :class:`SELayerLinear` - a sigmoid gate computed from another tensor (``featurized_pe``);
* :class:`MLN` - motion-aware layer norm: LayerNorm whose scale and shift come from a code.

The formulas and their element order follow the reference exactly (``positional_encoding.py`` and
``misc.py`` of StreamPETR); the channel order matters because trained weights depend on it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def _sine_frequencies(num_feats: int, temperature: float, device: torch.device) -> torch.Tensor:
    """``temperature ** (2 * floor(i / 2) / num_feats)`` for i < num_feats, float32 (num_feats,)."""
    index = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """(..., F) angles -> (..., F): sin at even slots, cos at odd slots."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def pos2posemb3d(pos: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of points ``pos`` (..., 3) in [0, 1] -> (..., 3 * num_pos_feats), order (y, x, z)."""
    dim_t = _sine_frequencies(num_pos_feats, temperature, pos.device)
    angles = (pos * (2 * math.pi))[..., None] / dim_t  # (..., 3, F)
    per_axis = _interleave_sin_cos(angles)  # (..., 3, F)
    return torch.cat((per_axis[..., 1, :], per_axis[..., 0, :], per_axis[..., 2, :]), dim=-1)


def pos2posemb1d(pos: torch.Tensor, num_pos_feats: int = 256, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of ``pos`` (..., 1) -> (..., num_pos_feats), in ``pos``'s dtype (float64 stays)."""
    dim_t = _sine_frequencies(num_pos_feats, temperature, pos.device)
    return _interleave_sin_cos((pos * (2 * math.pi))[..., 0, None] / dim_t)


def nerf_positional_encoding(tensor: torch.Tensor, num_encoding_functions: int = 6) -> torch.Tensor:
    """``[sin(2^0 x), cos(2^0 x), ..., sin(2^(n-1) x), cos(2^(n-1) x)]`` per block of all inputs.

    ``tensor`` (..., K) -> (..., 2 * n * K); the input itself is not included.
    """
    frequencies = 2.0 ** torch.linspace(
        0.0, num_encoding_functions - 1, num_encoding_functions, dtype=tensor.dtype, device=tensor.device
    )
    scaled = tensor[..., None, :] * frequencies[:, None]  # (..., n, K)
    return torch.stack((scaled.sin(), scaled.cos()), dim=-2).flatten(-3)  # (..., n * 2 * K)


class SELayerLinear(nn.Module):
    """``x * sigmoid(W2 relu(W1 x_se))`` (state-dict names ``conv_reduce``, ``conv_expand``)."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Linear(channels, channels)
        self.act1 = nn.ReLU()
        self.conv_expand = nn.Linear(channels, channels)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor, x_se: torch.Tensor) -> torch.Tensor:
        """``x`` (..., C) gated by ``x_se`` (..., C) -> (..., C)."""
        return x * self.gate(self.conv_expand(self.act1(self.conv_reduce(x_se))))


class MLN(nn.Module):
    """Motion-aware layer norm: ``gamma(c) * LayerNorm(x) + beta(c)``, ``c`` reduced by Linear + ReLU.

    The LayerNorm has no affine parameters (eps 1e-5). Initialised as the identity modulation
    (gamma weight 0, bias 1; beta weight 0, bias 0), so a fresh MLN is a plain LayerNorm.

    Args:
        c_dim: size of the code ``c``.
        f_dim: feature size of ``x``.
    """

    def __init__(self, *, c_dim: int, f_dim: int = 256) -> None:
        super().__init__()
        self.c_dim = c_dim
        self.f_dim = f_dim
        self.reduce = nn.Sequential(nn.Linear(c_dim, f_dim), nn.ReLU())
        self.gamma = nn.Linear(f_dim, f_dim)
        self.beta = nn.Linear(f_dim, f_dim)
        self.ln = nn.LayerNorm(f_dim, elementwise_affine=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)
        nn.init.ones_(self.gamma.bias)
        nn.init.zeros_(self.beta.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``x`` (..., f_dim), ``c`` (..., c_dim) broadcastable to ``x``'s leading dims -> (..., f_dim)."""
        code = self.reduce(c)
        return self.gamma(code) * self.ln(x) + self.beta(code)
