"""What a detector carries from one call to the next: its stream state.

One call of the detector processes one frame of each of B streams (one per batch row). Between calls
the StreamPETR detector's :class:`StreamState` (``detector.stream_state``; plain state, not part of the
state dict) holds

=======================  ==========================================================================
part                     what it holds
=======================  ==========================================================================
``memory``               the memory queue (:class:`StreamingMemory`), written by the head every frame
``query_identities``     which decoder query wrote every memory row (:class:`QueryIdentities`)
``scenes``               the scene token of every row at the previous inference call: the detector's
                         own continuity rule at inference (:class:`SceneTokenContinuity`)
``frames``               the ``(scene_idx, frame_idx)`` of every row at the previous call, for callers
                         that number frames (:class:`StreamContinuity`)
``inference_ran``        whether the last frame ran in inference: training then drops those streams
=======================  ==========================================================================

The head reads and writes the state it is handed, so an exported graph runs the detector on a state of
its own (``head.new_stream_state(relative_time=True)``) without touching the detector's.

:meth:`StreamState.save` returns ``{"pts_bbox_head": {field: tensor}}``: the memory's fields
(:data:`MEMORY_FIELDS`) and the query ids, under the head that reads them, the layout of a checkpoint's
``streams`` entry. The continuity parts are not saved: checkpoints are written between training steps,
where continuity comes from the batch's ``prev_exists``; after :meth:`StreamState.load` the next
inference call starts every stream unless it is given ``prev_exists``.

Any detector that carries streams exposes ``stream_state`` with ``reset`` / ``save`` / ``load``
(:class:`StreamStateContract`): the trainer saves it in checkpoints and evaluation resets it.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Protocol

import torch
from torch import nn

from streampetr_plugin.models.layers.memory import StreamingMemory
from streampetr_plugin.models.layers.query_identities import QueryIdentities
from streampetr_plugin.models.layers.stream_continuity import SceneTokenContinuity, StreamContinuity

SAVED_UNDER = "pts_bbox_head"  # the module that reads the saved rows (the checkpoints' layout)


class StreamStateContract(Protocol):
    """What the trainer and evaluation use of a detector's ``stream_state``."""

    def reset(self) -> None:
        """Forget every stream."""

    def save(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """The state as tensors, grouped by the module that reads them."""

    def load(self, saved: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Replace the state with :meth:`save`'s; groups absent or empty start afresh."""


def stream_state_of(model: nn.Module) -> Optional[StreamStateContract]:
    """``model.stream_state``, or None for a detector that carries nothing from one call to the next."""
    return getattr(model, "stream_state", None)


class StreamState:
    """The StreamPETR detector's stream state (see the module docstring).

    Args:
        memory_len: memory rows kept from one frame to the next.
        embed_dims: channels of a memory row.
        relative_time: keep the memory's ages relative to the last frame in float32
            (:class:`StreamingMemory`; what an exported graph needs).
    """

    def __init__(self, *, memory_len: int, embed_dims: int, relative_time: bool = False) -> None:
        self.memory = StreamingMemory(capacity=memory_len, embed_dims=embed_dims, relative_time=relative_time)
        self.query_identities = QueryIdentities(capacity=memory_len)
        self.scenes = SceneTokenContinuity()
        self.frames = StreamContinuity()
        self.inference_ran = False

    def reset(self) -> None:
        """Forget every stream: memory, query ids and what the previous call saw."""
        self._forget_rows()
        self.scenes.reset()
        self.frames.reset()
        self.inference_ran = False

    def _forget_rows(self) -> None:
        self.memory.reset()
        self.query_identities.reset()

    def begin_training(self) -> None:
        """Before a training frame: forget the streams an inference call left (the reference resets after
        an evaluation). The frame positions stay: a caller records them before the frame runs, so they
        already describe the frame the memory is about to hold."""
        if self.inference_ran:
            self._forget_rows()
            self.scenes.reset()
            self.inference_ran = False

    def begin_inference(self) -> None:
        """Before an inference frame: the next training frame starts afresh."""
        self.inference_ran = True

    def fit_streams(self, prev_exists: torch.Tensor) -> torch.Tensor:
        """``prev_exists`` (B,) as it is, or all zeros with the memory forgotten when the memory holds a
        different number of streams (e.g. a smaller last batch): then every stream starts afresh."""
        if self.memory.batch_size in (None, prev_exists.shape[0]):
            return prev_exists
        self._forget_rows()
        return torch.zeros_like(prev_exists)

    def save(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """``{"pts_bbox_head": memory fields + query ids}`` (clones); the inner dict is empty while the
        memory is."""
        return {SAVED_UNDER: {**self.memory.save(), **self.query_identities.save()}}

    def load(self, saved: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Replace the state with :meth:`save`'s. A group without query ids (saved before the state held
        them) starts the ids afresh; an empty or absent group forgets every stream."""
        self.reset()
        fields = saved.get(SAVED_UNDER) or {}
        if fields:
            self.memory.load(fields)
            self.query_identities.load(fields)
