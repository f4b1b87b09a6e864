"""The PETR temporal decoder of StreamPETR.

Each layer runs, post-norm: self-attention over the queries plus the non-propagated memory rows,
LayerNorm, cross-attention to the image tokens, LayerNorm, FFN, LayerNorm. The decoder returns
``post_norm(query)`` after every layer, but feeds the **un-normalised** query to the next layer
(the reference's ``PETRTransformerDecoder``). Module names follow the reference's state dict:
``transformer.decoder.layers.<i>.{attentions.0, attentions.1, ffns.0, norms.0-2}`` and
``transformer.decoder.post_norm``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .multihead_attention import MultiheadAttention


class FFN(nn.Module):
    """``identity + (Linear -> ReLU -> Dropout -> Linear -> Dropout)(x)`` (mmcv FFN layout, 2 fcs)."""

    def __init__(self, *, embed_dims: int, feedforward_channels: int, ffn_drop: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(
                nn.Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True), nn.Dropout(ffn_drop)
            ),
            nn.Linear(feedforward_channels, embed_dims),
            nn.Dropout(ffn_drop),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class PETRTemporalDecoderLayer(nn.Module):
    """One decoder layer: self_attn, norm, cross_attn, norm, ffn, norm.

    Args:
        embed_dims: E.
        num_heads: attention heads of both attentions.
        feedforward_channels: hidden size of the FFN.
        dropout: self-attention probability and output dropout, cross-attention output dropout, and
            FFN dropout (the reference's single ``dropout=0.1`` / ``ffn_dropout=0.1``).
        attention_backend: name of a registered attention backend.
        with_cp: recompute the layer in the backward pass (activation checkpointing) when training.
    """

    def __init__(
        self,
        *,
        embed_dims: int,
        num_heads: int,
        feedforward_channels: int,
        dropout: float,
        attention_backend: str = "sdpa",
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(
            [
                MultiheadAttention(
                    embed_dims=embed_dims,
                    num_heads=num_heads,
                    attn_drop=dropout,
                    out_drop=dropout,
                    backend=attention_backend,
                ),
                # The reference's flash cross-attention has no attention-probability dropout.
                MultiheadAttention(
                    embed_dims=embed_dims,
                    num_heads=num_heads,
                    attn_drop=0.0,
                    out_drop=dropout,
                    backend=attention_backend,
                ),
            ]
        )
        self.ffns = nn.ModuleList(
            [FFN(embed_dims=embed_dims, feedforward_channels=feedforward_channels, ffn_drop=dropout)]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(3)])
        self.with_cp = with_cp

    def _forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        query_pos: torch.Tensor,
        key_pos: torch.Tensor,
        temp_memory: Optional[torch.Tensor],
        temp_pos: Optional[torch.Tensor],
        self_attn_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        if temp_memory is not None:
            self_key = torch.cat([query, temp_memory], dim=1)  # (B, Q + M', E)
            self_key_pos = torch.cat([query_pos, temp_pos], dim=1)
        else:
            self_key, self_key_pos = query, query_pos
        query = self.attentions[0](
            query, self_key, self_key, query_pos=query_pos, key_pos=self_key_pos, attn_mask=self_attn_mask
        )
        query = self.norms[0](query)
        query = self.attentions[1](query, key, key, query_pos=query_pos, key_pos=key_pos)
        query = self.norms[1](query)
        return self.norms[2](self.ffns[0](query))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        query_pos: torch.Tensor,
        key_pos: torch.Tensor,
        temp_memory: Optional[torch.Tensor] = None,
        temp_pos: Optional[torch.Tensor] = None,
        self_attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``query``/``query_pos`` (B, Q, E); ``key``/``key_pos`` (B, S, E) image tokens (also the values);
        ``temp_memory``/``temp_pos`` (B, M', E) extra self-attention keys/values; ``self_attn_mask``
        (Q, Q + M') bool, True = blocked. Returns (B, Q, E)."""
        args = (query, key, query_pos, key_pos, temp_memory, temp_pos, self_attn_mask)
        if self.with_cp and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


class PETRTransformerDecoder(nn.Module):
    """A stack of :class:`PETRTemporalDecoderLayer` with one ``post_norm`` shared by all outputs."""

    def __init__(
        self,
        *,
        num_layers: int,
        embed_dims: int,
        num_heads: int,
        feedforward_channels: int,
        dropout: float,
        attention_backend: str = "sdpa",
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                PETRTemporalDecoderLayer(
                    embed_dims=embed_dims,
                    num_heads=num_heads,
                    feedforward_channels=feedforward_channels,
                    dropout=dropout,
                    attention_backend=attention_backend,
                    with_cp=with_cp,
                )
                for _ in range(num_layers)
            ]
        )
        self.post_norm = nn.LayerNorm(embed_dims)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        query_pos: torch.Tensor,
        key_pos: torch.Tensor,
        temp_memory: Optional[torch.Tensor] = None,
        temp_pos: Optional[torch.Tensor] = None,
        self_attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Arguments as :meth:`PETRTemporalDecoderLayer.forward`. Returns (num_layers, B, Q, E)."""
        outputs = []
        for layer in self.layers:
            query = layer(query, key, query_pos, key_pos, temp_memory, temp_pos, self_attn_mask)
            outputs.append(self.post_norm(query))
        return torch.stack(outputs)


class PETRTemporalTransformer(nn.Module):
    """Holds the decoder (state-dict prefix ``transformer.decoder``); batch-first throughout.

    Initialisation follows the reference: every Linear of the decoder is Xavier-uniform with zero
    bias; the packed attention in-projections are Xavier-uniform with zero bias; LayerNorms are (1, 0).
    """

    def __init__(
        self,
        *,
        num_layers: int = 6,
        embed_dims: int = 256,
        num_heads: int = 8,
        feedforward_channels: int = 2048,
        dropout: float = 0.1,
        attention_backend: str = "sdpa",
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.decoder = PETRTransformerDecoder(
            num_layers=num_layers,
            embed_dims=embed_dims,
            num_heads=num_heads,
            feedforward_channels=feedforward_channels,
            dropout=dropout,
            attention_backend=attention_backend,
            with_cp=with_cp,
        )
        self.init_weights()

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(
        self,
        memory: torch.Tensor,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        pos_embed: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        temp_memory: Optional[torch.Tensor] = None,
        temp_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``memory``/``pos_embed`` (B, S, E) image tokens and their 3D position embedding; ``tgt``/
        ``query_pos`` (B, Q, E); ``attn_mask`` (Q, Q + M') self-attention mask, True = blocked;
        ``temp_memory``/``temp_pos`` (B, M', E). Returns the per-layer outputs (num_layers, B, Q, E)."""
        return self.decoder(tgt, memory, query_pos, pos_embed, temp_memory, temp_pos, attn_mask)
