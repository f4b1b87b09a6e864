"""Lay StreamPETR's streaming order out so that MindSpeed-MM's sampler replays it.

StreamPETR needs row b of every batch on a rank to continue one stream of frames
(:class:`~streampetr_plugin.data.sampler.StreamingTrainSampler`). MindSpeed-MM's only working
sampler, ``BaseRandomBatchSampler`` with ``shuffle: false`` and ``data_sharding: true``, gives rank r
the contiguous host indices ``[r * bucket, (r + 1) * bucket)`` in order, ``bucket = steps * mbs``,
cut into consecutive micro-batches of ``mbs`` when the dataset length is ``world * steps * mbs``.
So the host index ``r * steps * mbs + k * mbs + j`` is made to hold row j of rank r's k-th batch of
StreamPETR's own sampler: each rank then sees exactly the batches ``streampetr-run`` would give it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from streampetr_plugin.data.sampler import StreamingTrainSampler


@dataclass(frozen=True)
class Placement:
    """Where a host index sits in the layout, and which frame it holds."""

    rank: int
    step: int
    row: int
    frame: int


class StreamLayout:
    """``order[r, k, j]``: dataset index of row j of rank r's k-th batch.

    Args:
        order: (world, steps, micro_batch_size) int64.
    """

    def __init__(self, order: torch.Tensor) -> None:
        if order.dim() != 3 or order.numel() == 0:
            raise ValueError(f"a layout is (world, steps, micro_batch_size), got shape {tuple(order.shape)}")
        self.order = order.long()
        self.world_size, self.steps, self.micro_batch_size = (int(size) for size in order.shape)

    @classmethod
    def from_sampler(
        cls, group_flags: Sequence[int], *, micro_batch_size: int, world_size: int, seed: int, epochs: int
    ) -> "StreamLayout":
        """``epochs`` epochs of :class:`StreamingTrainSampler` on every rank, back to back."""
        per_rank: List[List[List[int]]] = []
        for rank in range(world_size):
            sampler = StreamingTrainSampler(
                group_flags, batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=seed
            )
            per_rank.append([batch for _ in range(epochs) for batch in sampler])
        return cls(torch.tensor(per_rank, dtype=torch.int64))

    def __len__(self) -> int:
        return self.order.numel()

    def place(self, host_index: int) -> Placement:
        if not 0 <= host_index < len(self):
            raise IndexError(f"host index {host_index} outside the layout of {len(self)}")
        rank, rest = divmod(host_index, self.steps * self.micro_batch_size)
        step, row = divmod(rest, self.micro_batch_size)
        return Placement(rank=rank, step=step, row=row, frame=int(self.order[rank, step, row]))
