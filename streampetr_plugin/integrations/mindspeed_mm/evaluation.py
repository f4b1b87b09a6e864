"""Detection evaluation outside MindSpeed-MM's loop, with StreamPETR's own loader and metric.

The host can only average ``output.loss`` over a validation loader (and not in sampler mode), so
the nuScenes metric runs here, exactly as ``streampetr-run`` evaluates: every rank streams its
contiguous, timestamp-ordered slice of the recipe's val set through the detector (streams reset by
scene change), the predictions are gathered and rank 0 scores them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Union

import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:  # the host imports this module on its light walk: no model code at import time
    from streampetr_plugin.models.stream_state import StreamState

logger = logging.getLogger(__name__)


class ContractView(nn.Module):
    """The host-facing model called with the data contract's batches (StreamPETR's own forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Dict[str, Any]) -> Any:
        return self.model.detector_forward(batch)

    @property
    def stream_state(self) -> StreamState:
        return self.model.stream_state


def evaluate_detector(
    model: nn.Module, recipe: Any, registries: Any, output_dir: Union[str, Path]
) -> Dict[str, Any]:
    """Run the recipe's val set (its dataset from ``registries``) on every rank (collective); the metrics on
    rank 0, ``{}`` elsewhere.

    ``model`` is the unwrapped host-facing model (``module`` of a DDP wrapper); it is left in
    training mode with fresh streams.
    """
    from streampetr_plugin.data.build import build_dataset
    from streampetr_plugin.data.loader import build_dataloader
    from streampetr_plugin.training.evaluation import (
        collect_predictions,
        default_evaluator,
        merge_predictions,
    )

    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    dataset = build_dataset(recipe, registries, training=False)
    loader = build_dataloader(
        dataset,
        batch_size=recipe.data.val_batch_size_per_device,
        num_workers=recipe.data.num_workers,
        rank=rank,
        world_size=world_size,
        seed=recipe.runtime.seed,
        training=False,
    )
    device = next(model.parameters()).device
    predictions = collect_predictions(
        ContractView(model), loader, device=device, autocast=model.autocast(device)
    )
    parts: List[Any] = [predictions]
    if distributed:
        parts = [None] * world_size
        dist.all_gather_object(parts, predictions)
    if rank != 0:
        return {}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = dict(default_evaluator(merge_predictions(parts), dataset, output_dir))
    logger.info("streampetr evaluation: %s", {k: v for k, v in metrics.items() if isinstance(v, float)})
    return metrics
