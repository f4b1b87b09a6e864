"""Multi-head attention with the reference's parameter names and dropout semantics.

The reference wraps ``torch.nn.MultiheadAttention`` (self-attention, via mmcv's ``MultiheadAttention``)
and ``FlashMHA`` (cross-attention) in modules that add positional encodings and a residual. Both keep
the packed projections under ``.attn``: ``attn.in_proj_weight`` (3E, E) = [W_q; W_k; W_v],
``attn.in_proj_bias`` (3E,), ``attn.out_proj`` Linear(E, E). This module keeps those names, so a decoder
layer's state-dict keys read ``...attentions.0.attn.in_proj_weight`` as in the reference, and computes
the scaled dot product with a backend from :mod:`streampetr_plugin.models.layers.attention`.

Dropout, as configured in the reference (``dropout=0.1`` for both attentions):

* self-attention: attention-probability dropout 0.1 and output dropout 0.1 (mmcv routes ``dropout`` to
  both);
* cross-attention: **no** attention-probability dropout (the config's value lands in ``FlashMHA``'s
  ``bias`` argument), output dropout 0.1.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import DEFAULT_ATTENTION_BACKEND, AttentionBackend, sdpa_attention, unbound_backend


class MultiheadAttentionCore(nn.Module):
    """Packed in-projection, head split, attention backend, out-projection.

    Inputs are batch-first: ``query`` (B, L, E), ``key`` and ``value`` (B, S, E); returns (B, L, E).
    ``backend`` names the attention kernel; ``attend`` is that kernel, the default's from the start and
    any other's once the model builder (or an adapter) looks it up in the ``attention_backends`` registry
    and calls :meth:`use_backend`.
    """

    def __init__(
        self,
        *,
        embed_dims: int,
        num_heads: int,
        attn_drop: float = 0.0,
        backend: str = DEFAULT_ATTENTION_BACKEND,
    ) -> None:
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} is not divisible by num_heads {num_heads}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self._backend = backend
        self.attend: AttentionBackend = (
            sdpa_attention if backend == DEFAULT_ATTENTION_BACKEND else unbound_backend(backend)
        )
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dims, embed_dims))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dims))
        self.out_proj = nn.Linear(embed_dims, embed_dims)
        self.reset_parameters()

    @property
    def backend(self) -> str:
        """The name of the kernel in use (read-only: :meth:`use_backend` changes name and kernel together)."""
        return self._backend

    def use_backend(self, name: str, attend: AttentionBackend) -> None:
        """Compute attention with the kernel ``attend``, registered as ``name``."""
        self._backend = name
        self.attend = attend

    def reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's init for the packed projection; the reference's transformer
        # init then makes out_proj Xavier-uniform with zero bias.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, -1).transpose(1, 2)  # (B, h, L, D)

    def attention_logits(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Scaled dot products (B, h, L, S) of ``query`` (B, L, E) and ``key`` (B, S, E), before softmax."""
        w_q, w_k, _ = self.in_proj_weight.chunk(3)
        b_q, b_k, _ = self.in_proj_bias.chunk(3)
        q = self._split_heads(F.linear(query, w_q, b_q))  # (B, h, L, D)
        k = self._split_heads(F.linear(key, w_k, b_k))  # (B, h, S, D)
        return q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._split_heads(F.linear(query, w_q, b_q))  # (B, h, L, D)
        k = self._split_heads(F.linear(key, w_k, b_k))  # (B, h, S, D)
        v = self._split_heads(F.linear(value, w_v, b_v))  # (B, h, S, D)
        out = self.attend(q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop, training=self.training)
        out = out.transpose(1, 2).reshape(query.shape[0], query.shape[1], self.embed_dims)  # (B, L, E)
        return self.out_proj(out)


class MultiheadAttention(nn.Module):
    """``identity + dropout(attention(query + query_pos, key + key_pos, value))``.

    Args:
        embed_dims: E.
        num_heads: number of heads (E must be divisible by it).
        attn_drop: dropout on the attention probabilities (training only).
        out_drop: dropout on the attention output before the residual add.
        backend: name of a registered attention backend.
    """

    def __init__(
        self,
        *,
        embed_dims: int,
        num_heads: int,
        attn_drop: float = 0.0,
        out_drop: float = 0.0,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.attn = MultiheadAttentionCore(
            embed_dims=embed_dims, num_heads=num_heads, attn_drop=attn_drop, backend=backend
        )
        self.out_drop = nn.Dropout(out_drop)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        identity: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
        key_pos: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``query`` (B, L, E); ``key``, ``value`` (B, S, E); positions alike; ``attn_mask`` (L, S) bool,
        True = blocked. ``identity`` defaults to ``query`` without its position. Returns (B, L, E)."""
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        return identity + self.out_drop(self.attn(query, key, value, attn_mask))
