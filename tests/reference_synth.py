"""Deterministic synthetic weights and images of the reference fidelity fixtures.

Every value is an exact function of (tensor key, flat element index) through a 32-bit integer hash,
evaluated in int64 and float64 and rounded once to float32, so the result is the same on every
platform and torch version. The reference detector produced the fidelity fixture's outputs
(``tests/fixtures/r50_128x352_3frames.pt``) from exactly these weights and images, so our model can be
given the same ones without storing them.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, Mapping, Sequence, Tuple, Union

import torch

_MASK32 = 0xFFFFFFFF
_KNUTH = 2654435761
_MIX = 0x45D9F3B

# The reference's R50 normalisation (RGB); for noise images only the numbers matter.
IMAGE_MEAN = (123.675, 116.28, 103.53)
IMAGE_STD = (58.395, 57.12, 57.375)

# log(0.01 / 0.99): the focal-loss prior the reference initialises classification biases with.
_FOCAL_PRIOR_BIAS = -math.log(99.0)
_PRIOR_BIAS_KEYS = re.compile(
    r"^(pts_bbox_head\.cls_branches\.\d+\.6\.bias|img_roi_head\.cls\.bias|img_roi_head\.centerness\.bias)$"
)
_RESNET_LAST_BN = re.compile(r"^img_backbone\.layer\d+\.\d+\.bn3\.weight$")
_SHARED_BRANCH = re.compile(r"(pts_bbox_head\.(?:cls|reg)_branches)\.\d+\.")


def fnv1a32(text: str) -> int:
    """FNV-1a 32-bit hash of the UTF-8 bytes of ``text``."""
    value = 0x811C9DC5
    for byte in text.encode("utf-8"):
        value = ((value ^ byte) * 0x01000193) & _MASK32
    return value


def hash_uniform(count: int, salt: int) -> torch.Tensor:
    """``count`` values in [0, 1) (float64): mix32(i * 2654435761 + salt) / 2**32."""
    h = (torch.arange(count, dtype=torch.int64) * _KNUTH + int(salt)) & _MASK32
    h = h ^ (h >> 16)
    h = (h * _MIX) & _MASK32
    h = h ^ (h >> 16)
    h = (h * _MIX) & _MASK32
    h = h ^ (h >> 16)
    return h.to(torch.float64) / 4294967296.0


def canonical_key(key: str) -> str:
    """The key whose salt generates ``key``: all six shared branch slots use slot 0's salt."""
    return _SHARED_BRANCH.sub(r"\1.0.", key)


def make_tensor(key: str, shape: Sequence[int], constants: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One state-dict entry by the fixture's value rules (first matching rule wins)."""
    shape = tuple(int(s) for s in shape)
    if key in constants:
        return constants[key].to(torch.float32).clone().reshape(shape)
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    numel = math.prod(shape)
    u = hash_uniform(numel, fnv1a32(canonical_key(key))).reshape(shape)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    if key.endswith(".running_mean"):
        value = 0.2 * (u - 0.5)
    elif key.endswith(".running_var"):
        value = 1.0 + 0.5 * u
    elif key.endswith("reference_points.weight"):
        value = u
    elif len(shape) == 4:
        value = math.sqrt(6.0 / fan_in) * (2.0 * u - 1.0)
    elif len(shape) >= 2:
        value = math.sqrt(3.0 / fan_in) * (2.0 * u - 1.0)
        if key.endswith("in_proj_weight"):
            embed_dims = shape[0] // 3
            value[: 2 * embed_dims] *= 2.0  # W_q and W_k: sharper attention than LeCun scale
    elif len(shape) == 1 and key.endswith(".weight"):
        value = 0.2 + 0.1 * u if _RESNET_LAST_BN.match(key) else 0.9 + 0.2 * u
    elif _PRIOR_BIAS_KEYS.match(key):
        value = _FOCAL_PRIOR_BIAS + 0.2 * (u - 0.5)
    elif len(shape) == 1:
        value = 0.2 * (u - 0.5)
    else:
        value = u
    return value.to(torch.float32)


def make_state_dict(
    shapes: Mapping[str, Sequence[int]], constants: Mapping[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """The reference ``state_dict`` for a key -> shape list."""
    return {key: make_tensor(key, shape, constants) for key, shape in shapes.items()}


def make_images(
    salt: Union[str, int],
    shape: Tuple[int, ...],
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
) -> torch.Tensor:
    """Normalised noise images ``(N, 3, H, W)`` float32: pixel floor(256 u) per element."""
    salt_int = fnv1a32(salt) if isinstance(salt, str) else int(salt)
    pixels = torch.floor(256.0 * hash_uniform(math.prod(shape), salt_int)).reshape(shape)
    channel_shape = (1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float64).reshape(channel_shape)
    std_t = torch.tensor(std, dtype=torch.float64).reshape(channel_shape)
    return ((pixels - mean_t) / std_t).to(torch.float32)


def load_key_list(path: Union[str, Path]) -> Dict[str, Tuple[int, ...]]:
    """key -> shape from a reference state-dict JSON (``tests/fixtures/reference_state_dict_*.json``)."""
    with open(path, encoding="utf-8") as handle:
        entries = json.load(handle)["state_dict"]
    return {key: tuple(entry["shape"]) for key, entry in entries.items()}
