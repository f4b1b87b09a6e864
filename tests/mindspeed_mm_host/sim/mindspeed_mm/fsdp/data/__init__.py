"""SIMULATION of ``mindspeed_mm/fsdp/data`` (#9, #10, #12).

``build_mm_dataset`` requires ``dataset_type``, ``basic_parameters`` and ``preprocess_parameters``
(``AssertionError`` otherwise) and calls the registered object with the keyword arguments
``basic_param``, ``preprocess_param`` and ``dataset_param``, all plain dicts. ``build_mm_dataloader``:
``base`` mode ignores batch size, shuffle, drop_last and sharding (batch 1, sequential, every rank the
same samples) and needs a registered collator; ``sampler`` mode supports only
``BaseRandomBatchSampler`` (rank and world from the DP group) and prefers ``dataset.collate_fn``;
without one a registered collator id is required (``ValueError``). Workers are all seeded with the
same config seed. ``build_iterations`` is an endless cyclic iterator.
"""

import random
from typing import Any, Callable, Dict, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from mindspeed_mm.fsdp.data.sampler import BaseRandomBatchSampler
from mindspeed_mm.fsdp.utils.register import data_register

DATA_COLLATOR: Dict[str, type] = {}


def _register_data_collator(name: str, cls: type) -> None:
    if name in DATA_COLLATOR:
        raise ValueError(f"data collator {name} is already registered")
    DATA_COLLATOR[name] = cls


def resolve_data_collator(collate_param: Dict[str, Any]):
    params = dict(collate_param)
    collator_id = params.pop("collator_id", None) or params.pop("model_name", None)
    params.pop("model_name", None)
    if collator_id is None:
        raise ValueError("collate_param needs `collator_id` (or the deprecated `model_name`)")
    if collator_id not in DATA_COLLATOR:
        raise ValueError(f"Unknown data collator: {collator_id}")
    return DATA_COLLATOR[collator_id], params


def build_mm_dataset(dataset_param) -> Any:
    if not isinstance(dataset_param, dict):
        dataset_param = dataset_param.to_dict()
    for key in ("dataset_type", "basic_parameters", "preprocess_parameters"):
        if key not in dataset_param:
            raise AssertionError(f"Key parameter missing: {key}")
    factory = data_register.get(dataset_param["dataset_type"])
    return factory(
        basic_param=dataset_param["basic_parameters"],
        preprocess_param=dataset_param["preprocess_parameters"],
        dataset_param=dataset_param,
    )


def seed_worker(seed: int) -> Callable[[int], None]:
    def seed_this_worker(_worker_id: int) -> None:
        np.random.seed(seed)
        torch.manual_seed(seed)
        random.seed(seed)

    return seed_this_worker


class StatefulDataLoaderStandIn(DataLoader):
    """torchdata's ``StatefulDataLoader`` as far as the trainer uses it (``state_dict``: the sampler's)."""

    def state_dict(self) -> Dict[str, Any]:
        sampler = self.batch_sampler
        return {"batch_sampler": sampler.state_dict()} if hasattr(sampler, "state_dict") else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "batch_sampler" in state:
            self.batch_sampler.load_state_dict(state["batch_sampler"])


def build_mm_dataloader(
    dataset, dataloader_param: Dict[str, Any], process_group=None, dataset_param=None, model=None
):
    params = dict(dataloader_param)
    if "dataloader_mode" not in params:
        raise AssertionError("Key parameter missing: dataloader_mode")
    mode = params.pop("dataloader_mode")
    seed = params.get("seed", 1024)
    num_workers = params.get("num_workers", 0)
    collate_param = params.get("collate_param") or {}
    if mode == "base":
        collate_fn = None
        if collate_param:
            collator, collate_kwargs = resolve_data_collator(collate_param)
            collate_fn = collator(dataset_param=dataset_param, model=model, **collate_kwargs)
        return StatefulDataLoaderStandIn(
            dataset, collate_fn=collate_fn, num_workers=num_workers, worker_init_fn=seed_worker(seed)
        )
    if mode != "sampler":
        raise NotImplementedError(f"Unsupported dataloader_mode: {mode}")
    if params.get("sampler_type") != "BaseRandomBatchSampler":
        raise NotImplementedError(f"Sampler type {params.get('sampler_type')} is not implemented.")
    batch_sampler = BaseRandomBatchSampler(
        dataset,
        batch_size=params.get("batch_size", 1),
        num_replicas=process_group.size(),
        rank=process_group.rank(),
        shuffle=params.get("shuffle", False),
        drop_last=params.get("drop_last", False),
        data_sharding=params.get("data_sharding", False),
    )
    collate_fn = None
    if collate_param:
        if callable(getattr(dataset, "collate_fn", None)):
            collate_fn = dataset.collate_fn
        else:
            collator, collate_kwargs = resolve_data_collator(collate_param)
            collate_fn = collator(dataset_param=dataset_param, model=model, **collate_kwargs)
    return StatefulDataLoaderStandIn(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        worker_init_fn=seed_worker(seed),
    )


def build_iterations(train_dataloader) -> Iterator[Any]:
    def cyclic() -> Iterator[Any]:
        while True:
            for batch in train_dataloader:
                yield batch

    return cyclic()
