"""SIMULATION of ``mindspeed_mm/fsdp/data/dataloader/sampler.py`` (#11): ``BaseRandomBatchSampler``.

``drop_last=False`` raises. ``consumed_samples`` counts global samples (+``mbs * W`` per yielded
batch); epoch = ``consumed // (N - N % (mbs W))``; shuffling uses ``Generator().manual_seed(epoch)``
(the config seed is not used). ``data_sharding``: rank r walks the contiguous bucket
``[r B, (r+1) B)`` with ``B = (N // (mbs W)) mbs``, resuming at ``current_epoch_samples // W``;
otherwise rank r takes ``[r::W]`` of ``(N // mbs) mbs`` indices. Micro-batches are consecutive runs
of ``mbs``; an incomplete tail is dropped. State: ``{"samples_yielded": consumed}``, applied at the
next ``__iter__``.
"""

from typing import Any, Dict, Iterator, List, Optional

import torch

YIELDED = "samples_yielded"


class BaseRandomBatchSampler:
    def __init__(
        self,
        dataset,
        batch_size: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        data_sharding: bool = False,
    ) -> None:
        if not drop_last:
            raise ValueError("It is not implemented that the drop_last is false.")
        self.total_samples = len(dataset)
        self.micro_batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.data_sharding = data_sharding
        self.consumed_samples = 0
        self.next_consumed_samples: Optional[int] = None
        self.per_step = batch_size * num_replicas
        self.last_batch_size = self.total_samples % self.per_step

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[List[int]]:
        if self.next_consumed_samples is not None:
            self.consumed_samples, self.next_consumed_samples = self.next_consumed_samples, None
        active = self.total_samples - self.last_batch_size
        epoch = self.consumed_samples // active
        epoch_samples = self.consumed_samples % active
        if self.data_sharding:
            bucket = (self.total_samples // self.per_step) * self.micro_batch_size
            order = self._order(bucket, epoch)[epoch_samples // self.num_replicas :]
            indices = [self.rank * bucket + i for i in order]
        else:
            full = (self.total_samples // self.micro_batch_size) * self.micro_batch_size
            indices = self._order(full, epoch)[epoch_samples:][self.rank :: self.num_replicas]
        batch: List[int] = []
        for index in indices:
            batch.append(index)
            if len(batch) == self.micro_batch_size:
                self.consumed_samples += self.per_step
                yield batch
                batch = []

    def _order(self, count: int, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(count))
        generator = torch.Generator()
        generator.manual_seed(epoch)
        return torch.randperm(count, generator=generator).tolist()

    def state_dict(self) -> Dict[str, Any]:
        return {YIELDED: self.consumed_samples}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if YIELDED not in state or state[YIELDED] < 0:
            raise ValueError("Invalid state_dict")
        self.next_consumed_samples = state[YIELDED]
