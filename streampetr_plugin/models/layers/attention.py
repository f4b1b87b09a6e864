"""Attention backends: the scaled dot-product core of multi-head attention, selectable by name.

A backend is a callable

    attend(q, k, v, *, attn_mask, dropout_p, training) -> out

on head-split tensors ``q`` (B, heads, L, D), ``k`` / ``v`` (B, heads, S, D), returning (B, heads, L, D).
``attn_mask`` is ``None`` or a boolean tensor broadcastable to (B, heads, L, S) with **True = blocked**
(the convention of ``torch.nn.MultiheadAttention`` and of the reference's denoising mask). ``dropout_p``
is the attention-probability dropout, applied only when ``training`` is true. The softmax scale is
``1 / sqrt(D)``.

Built in: ``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention``, the default) and ``"math"``
(an explicit softmax, the reference for tests); the Ascend kernel ``"npu_fusion_attention"`` lives with
its adapter. They are components of the ``attention_backends`` registry like any other: a plugin adds
its own kernel through ``streampetr_register_attention_backends``, and the model builder hands each
attention module the kernel its name selects.
"""
from __future__ import annotations

import math
from typing import Optional, Protocol

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


DEFAULT_ATTENTION_BACKEND = "sdpa"


def unbound_backend(name: str) -> AttentionBackend:
    """A stand-in for the kernel ``name`` until the model builder looks it up in the registry."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: object) -> torch.Tensor:
        raise RuntimeError(
            f"attention backend {name!r} is not bound to a kernel: build the model with build_model(recipe, "
            "registries), or give the module a kernel with use_backend(name, attend)"
        )

    return attend


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

