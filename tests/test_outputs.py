"""The detector output types: what DistributedDataParallel sees of a training frame's losses."""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from streampetr_plugin.models.outputs import TrainingOutputs


def test_distributed_data_parallel_finds_every_loss_term_of_a_training_frame():
    # DistributedDataParallel routes a forward's output through its gradient hooks by flattening it with
    # pytree; a term it cannot see is not synchronised (static_graph's first iteration).
    losses = {"loss_cls": torch.tensor(1.0), "d0.loss_bbox": torch.tensor(2.0), "share": torch.tensor(0.5)}
    leaves, spec = pytree.tree_flatten(TrainingOutputs(losses=losses))
    assert len(leaves) == 3 and all(any(leaf is value for value in losses.values()) for leaf in leaves)
    rebuilt = pytree.tree_unflatten([leaf * 2 for leaf in leaves], spec)
    assert isinstance(rebuilt, TrainingOutputs)
    assert {name: float(value) for name, value in rebuilt.losses.items()} == {
        "loss_cls": 2.0, "d0.loss_bbox": 4.0, "share": 1.0
    }
