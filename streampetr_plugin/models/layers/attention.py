"""Attention backends: the scaled dot-product core of multi-head attention, selectable by name.

A backend is a callable

    attend(q, k, v, *, attn_mask, dropout_p, training) -> out

on head-split tensors ``q`` (B, heads, L, D), ``k`` / ``v`` (B, heads, S, D), returning (B, heads, L, D).
``attn_mask`` is ``None`` or a boolean tensor broadcastable to (B, heads, L, S) with **True = blocked**
(the convention of ``torch.nn.MultiheadAttention`` and of the reference's denoising mask). ``dropout_p``
is the attention-probability dropout, applied only when ``training`` is true. The softmax scale is
``1 / sqrt(D)``.

Built in: ``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention``, the default) and ``"math"``
(an explicit softmax, the reference for tests). An adapter adds its own kernel with
:func:`register_attention_backend`, e.g. the Ascend adapter registers ``"npu_fusion_attention"``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attn_mask: Optional[torch.Tensor],
        dropout_p: float,
        training: bool,
    ) -> torch.Tensor:
        ...


_BACKENDS: Dict[str, AttentionBackend] = {}


def register_attention_backend(name: str, backend: AttentionBackend, *, replace: bool = False) -> None:
    """Make ``backend`` selectable as ``name``; a taken name is an error unless ``replace``."""
    if name in _BACKENDS and not replace:
        raise ValueError(f"attention backend {name!r} is already registered")
    _BACKENDS[name] = backend


def get_attention_backend(name: str) -> AttentionBackend:
    """The backend registered as ``name``."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise KeyError(
            f"unknown attention backend {name!r}; registered: {sorted(_BACKENDS)}"
        ) from None


def available_attention_backends() -> List[str]:
    """Names of the registered backends, sorted."""
    return sorted(_BACKENDS)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """PyTorch's fused scaled dot-product attention."""
    # SDPA's boolean mask means "may attend", ours means "blocked".
    allowed = None if attn_mask is None else ~attn_mask
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, dropout_p=dropout_p if training else 0.0
    )


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Explicit ``softmax(q k^T / sqrt(D)) v``, scaling ``q`` first like ``torch.nn.MultiheadAttention``."""
    scores = torch.matmul(q * math.sqrt(1.0 / q.size(-1)), k.transpose(-2, -1))  # (B, h, L, S)
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if training and dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v)


register_attention_backend("sdpa", sdpa_attention)
register_attention_backend("math", math_attention)
