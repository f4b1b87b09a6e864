"""DataLoader construction for streaming training and evaluation."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, get_worker_info

from .collate import collate_frames
from .dataset import NuScenesStreamDataset
from .sampler import StreamingEvalSampler, StreamingTrainSampler
from .worker_transfer import InlineSmallTensors, tensors_again

__all__ = ["StreamingDataLoader", "build_dataloader", "endless_batches"]


def _seed_worker(worker_id: int) -> None:
    """Give each worker process its own running RNG for unkeyed draws; keyed draws stay worker-independent."""
    info = get_worker_info()
    info.dataset.reseed_running(info.seed)


class StreamingDataLoader(DataLoader):
    """A DataLoader whose ``state_dict()`` counts the batches actually handed out.

    Workers prefetch ahead of the training loop, so the batch sampler's own position runs ahead of
    what was consumed; this loader reports the consumed position, which is what a checkpoint needs.
    With workers, small tensors cross from them as numpy arrays (:mod:`.worker_transfer`); the
    batches handed out are the same. ``frame_collate`` is the collate function itself.
    """

    def __init__(self, dataset: Any, *, collate_fn: Callable[[Sequence[Any]], Any], num_workers: int = 0,
                 **options: Any) -> None:
        self.frame_collate = collate_fn
        if num_workers > 0:
            collate_fn = InlineSmallTensors(collate_fn)
        super().__init__(dataset, collate_fn=collate_fn, num_workers=num_workers, **options)

    def __iter__(self) -> Iterator[Dict[str, object]]:
        self._consumed = self.batch_sampler.iteration
        for batch in super().__iter__():
            self._consumed += 1
            yield tensors_again(batch) if self.num_workers > 0 else batch

    def state_dict(self) -> Dict[str, int]:
        """The batch sampler's state at the last batch handed out."""
        state = self.batch_sampler.state_dict()
        state["iteration"] = getattr(self, "_consumed", self.batch_sampler.iteration)
        return state

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)
        self._consumed = self.batch_sampler.iteration


def build_dataloader(
    dataset: NuScenesStreamDataset,
    *,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    seed: int,
    training: bool,
    pin_memory: bool = False,
) -> StreamingDataLoader:
    """Loader of collated batches (see :mod:`streampetr_plugin.data.batch`) for this rank.

    ``batch_size`` is per device. Training uses :class:`StreamingTrainSampler` over the dataset's
    sequence groups (the same ``seed`` on every rank), evaluation :class:`StreamingEvalSampler`.
    A dataset with ``accepts_draw_keys = True`` receives ``(index, (rank, iteration, slot))`` in
    training and seeds its augmentation from that, so a resumed run repeats exactly the draws of an
    uninterrupted one, whatever the number of workers. Worker
    processes persist across epochs.
    """
    if training:
        batch_sampler = StreamingTrainSampler(
            dataset.flag, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
            keyed=getattr(dataset, "accepts_draw_keys", False),
        )
    else:
        batch_sampler = StreamingEvalSampler(len(dataset), batch_size=batch_size, rank=rank,
                                             world_size=world_size)
    dataset.reseed(seed, rank)
    generator = torch.Generator()
    generator.manual_seed(seed * 65_537 + rank)
    return StreamingDataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_frames,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def endless_batches(
    loader: Any,
    *,
    iterator: Optional[Iterator[Any]] = None,
    first_epoch: int = 0,
    epoch_sampler: Any = None,
) -> Iterator[Any]:
    """Batches from ``loader`` forever: after each pass ``epoch_sampler.set_epoch(next epoch)`` (when it
    has that method) and a fresh ``iter(loader)``. ``iterator``: the first pass, already started from
    ``loader`` (default: a new one). An empty pass is an error, not an endless loop."""
    epoch = first_epoch
    iterator = iter(loader) if iterator is None else iterator
    while True:
        yielded = False
        for batch in iterator:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("the training data loader yielded no batch")
        epoch += 1
        set_epoch = getattr(epoch_sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        iterator = iter(loader)
