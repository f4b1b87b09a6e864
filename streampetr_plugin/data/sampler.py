"""Batch samplers for streaming: every batch row follows its own stream of frames.

Training (:class:`StreamingTrainSampler`, the reference's ``InfiniteGroupEachSampleInBatchSampler``):
the G = batch_size x world_size global slots share one stream of sequence-group ids, made of
successive ``torch.randperm(num_groups)`` draws from a generator seeded with ``seed`` (the same on
every rank). Global slot g = rank x batch_size + b takes stream positions g, g + G, g + 2G, ...
and emits the frames of each group in temporal order, one per iteration, so row b of every batch
on a rank continues the same stream and the detector's memory row b carries it. A group's *epoch*
is the permutation it was drawn from: every sample is emitted exactly once per epoch, over all
slots of all ranks. ``len()`` is the reference's iterations per epoch
(``num_samples // G``); each ``iter()`` yields that many batches and the streams carry on across
calls.

Evaluation (:class:`StreamingEvalSampler`, the plugin's ``DistributedSampler``): the timestamp-
ordered indices are padded by repeating the first ones to a multiple of world_size x batch_size;
rank r takes the r-th contiguous slice and row b of its batches walks the b-th contiguous part of
that slice. With batch size 1 this is exactly the reference (padding duplicates: keep each
sample token's first result).

Both expose their position through ``state_dict()`` / ``load_state_dict()`` (a plain iteration
count: the streams are a pure function of it and the seed, so every rank can restore from rank 0's
state).
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["StreamingTrainSampler", "StreamingEvalSampler"]


class StreamingTrainSampler(Sampler[List[int]]):
    """Yield ``batch_size`` dataset indices per iteration, row b streaming its own sequence groups.

    With ``keyed=True`` each entry is ``(index, (rank, iteration, slot))`` instead: the key names the
    draw, so a dataset can seed its augmentation from it and a resumed run (or one with another number
    of loader workers) makes exactly the same random draws.
    """

    def __init__(
        self,
        group_flags: Sequence[int],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        keyed: bool = False,
    ) -> None:
        flags = np.asarray(group_flags, dtype=np.int64)
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.keyed = keyed
        self.num_samples = len(flags)
        self.global_batch_size = batch_size * world_size
        group_sizes = np.bincount(flags)
        self.num_groups = len(group_sizes)
        if self.num_groups < self.global_batch_size:
            raise ValueError(
                f"{self.num_groups} sequence groups cannot feed {self.global_batch_size} stream slots "
                f"(batch_size {batch_size} x world_size {world_size}): use more scenes, a larger "
                "seq_split_num or fewer slots"
            )
        order = np.argsort(flags, kind="stable")
        self._group_members: List[np.ndarray] = np.split(order, np.cumsum(group_sizes)[:-1])
        self._permutations: List[np.ndarray] = []
        self._generator = torch.Generator()
        self._generator.manual_seed(seed)
        self._reset(0)

    def _group_at(self, position: int) -> int:
        """Group id at a stream position, drawing permutations as needed."""
        epoch, offset = divmod(position, self.num_groups)
        while len(self._permutations) <= epoch:
            self._permutations.append(torch.randperm(self.num_groups, generator=self._generator).numpy())
        return int(self._permutations[epoch][offset])

    def _reset(self, iteration: int) -> None:
        """Put every local slot where it is after ``iteration`` iterations."""
        self.iteration = iteration
        self._groups_taken = [0] * self.batch_size
        self._buffers: List[List[int]] = [[] for _ in range(self.batch_size)]
        self._buffer_epochs = [0] * self.batch_size
        self.slot_epochs = [0] * self.batch_size
        for slot in range(self.batch_size):
            remaining = iteration
            while remaining > 0:
                members = self._take_group(slot)
                used = min(remaining, len(members))
                self._buffers[slot] = members[used:]
                remaining -= used
            self.slot_epochs[slot] = self._buffer_epochs[slot]

    def _take_group(self, slot: int) -> List[int]:
        """Start the slot's next group; returns its sample indices in temporal order."""
        position = self.rank * self.batch_size + slot + self._groups_taken[slot] * self.global_batch_size
        self._groups_taken[slot] += 1
        self._buffer_epochs[slot] = position // self.num_groups
        return self._group_members[self._group_at(position)].tolist()

    def __len__(self) -> int:
        return max(1, self.num_samples // self.global_batch_size)

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(len(self) - self.iteration % len(self)):
            batch = []
            for slot in range(self.batch_size):
                if not self._buffers[slot]:
                    self._buffers[slot] = self._take_group(slot)
                index = self._buffers[slot].pop(0)
                batch.append((index, (self.rank, self.iteration, slot)) if self.keyed else index)
                self.slot_epochs[slot] = self._buffer_epochs[slot]
            self.iteration += 1
            yield batch

    @property
    def epoch(self) -> int:
        """Iteration-based epoch (the reference's ``iteration // num_iters_per_epoch``)."""
        return self.iteration // len(self)

    def state_dict(self) -> Dict[str, int]:
        return {"iteration": self.iteration, "seed": self.seed, "global_batch_size": self.global_batch_size,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Resume after ``state['iteration']`` iterations; the stream configuration must match."""
        expected = {"seed": self.seed, "global_batch_size": self.global_batch_size,
                    "num_samples": self.num_samples}
        mismatched = {
            key: (state.get(key), value) for key, value in expected.items() if state.get(key) != value
        }
        if mismatched:
            raise ValueError(f"sampler state does not match this sampler (saved, current): {mismatched}")
        self._reset(int(state["iteration"]))


class StreamingEvalSampler(Sampler[List[int]]):
    """Contiguous, timestamp-ordered slices: rank r, row b walks its own contiguous part in order."""

    def __init__(self, num_samples: int, *, batch_size: int = 1, rank: int = 0, world_size: int = 1) -> None:
        if num_samples < 1 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"invalid num_samples={num_samples}, batch_size={batch_size}, rank={rank}, "
                f"world_size={world_size}"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        streams = world_size * batch_size
        total = math.ceil(num_samples / streams) * streams
        indices = (list(range(num_samples)) * math.ceil(total / num_samples))[:total]
        per_rank = total // world_size
        rank_indices = indices[rank * per_rank:(rank + 1) * per_rank]
        per_row = per_rank // batch_size
        self._rows = [rank_indices[b * per_row:(b + 1) * per_row] for b in range(batch_size)]
        self.position = 0

    def __len__(self) -> int:
        return len(self._rows[0])

    def __iter__(self) -> Iterator[List[int]]:
        while self.position < len(self):
            batch = [row[self.position] for row in self._rows]
            self.position += 1
            yield batch
        self.position = 0

    @property
    def iteration(self) -> int:
        return self.position

    def state_dict(self) -> Dict[str, int]:
        return {"iteration": self.position, "num_samples": self.num_samples}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state.get("num_samples") != self.num_samples:
            raise ValueError(
                f"sampler state is for {state.get('num_samples')} samples, this one has {self.num_samples}"
            )
        self.position = int(state["iteration"])
