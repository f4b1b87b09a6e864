"""The dataset MindSpeed-MM builds for ``dataset_type: streampetr_nuscenes``.

The host calls it with ``basic_param``, ``preprocess_param`` and ``dataset_param`` (plain dicts);
only ``dataset_param.streampetr`` is read (``basic_param`` carries the host's LLaMA-Factory defaults,
which mean nothing here). The recipe's training dataset is wrapped so that:

* item ``i`` is the frame :class:`~.layout.StreamLayout` puts at host index ``i`` (StreamPETR's
  own stream order, per rank), plus integer ``scene_idx`` / ``frame_idx`` (position in its scene)
  and ``sample_idx`` (dataset index) for the model's continuity check;
* :meth:`collate_fn` (which the host's sampler mode prefers over its collator registry) checks that
  the host delivered one whole layout step of this rank, builds the batch contract and encodes it
  as a flat dict of non-floating tensors (:mod:`.codec`).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, get_worker_info

from streampetr_plugin.integrations.mindspeed_mm.codec import encode_batch
from streampetr_plugin.integrations.mindspeed_mm.config import HostDatasetParams, read_block
from streampetr_plugin.integrations.mindspeed_mm.layout import Placement, StreamLayout

PLACEMENT_KEY = "_placement"
LAYOUT_HINT = (
    "set data.dataloader_param: {dataloader_mode: sampler, sampler_type: BaseRandomBatchSampler, "
    "shuffle: false, drop_last: true, data_sharding: true} and training.micro_batch_size equal to "
    "data.dataset_param.streampetr.micro_batch_size"
)


class StreamLayoutError(RuntimeError):
    """The host's sampler did not deliver the streaming layout the dataset laid out."""


def scene_positions(scene_tokens: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scene index in order of first appearance, position of the frame within its scene), both (n,) int64."""
    scene_ids: Dict[str, int] = {}
    frames_seen: Dict[str, int] = {}
    scene_idx, frame_idx = [], []
    for token in scene_tokens:
        scene_idx.append(scene_ids.setdefault(token, len(scene_ids)))
        frame_idx.append(frames_seen.get(token, 0))
        frames_seen[token] = frame_idx[-1] + 1
    return torch.tensor(scene_idx, dtype=torch.int64), torch.tensor(frame_idx, dtype=torch.int64)


class StreamPETRNuScenesDataset(Dataset):
    """StreamPETR's training frames in per-rank streaming order, for MindSpeed-MM (see module docstring)."""

    def __init__(
        self,
        basic_param: Optional[Mapping[str, Any]] = None,
        preprocess_param: Optional[Mapping[str, Any]] = None,
        dataset_param: Optional[Mapping[str, Any]] = None,
        **_: Any,
    ) -> None:
        from streampetr_plugin import load_recipe
        from streampetr_plugin.data.build import build_dataset
        from streampetr_plugin.host import create_plugin_host

        params = read_block(dataset_param or {}, HostDatasetParams)
        plugins = create_plugin_host()  # MindSpeed-MM calls this entry by itself: the plugins start here
        recipe = load_recipe(params.recipe, params.recipe_overrides, plugins)
        self.frames = build_dataset(recipe, plugins.registries, training=True)
        self.rank = int(os.environ.get("RANK", "0"))
        self.seed = recipe.runtime.seed
        world_size = params.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        self.layout = StreamLayout.from_sampler(
            self.frames.flag,
            micro_batch_size=params.micro_batch_size,
            world_size=world_size,
            seed=self.seed,
            epochs=params.epochs,
        )
        self.scene_idx, self.frame_idx = scene_positions(
            [sample.scene_token for sample in self.frames.samples]
        )
        # The augmentation stream streampetr-run's loader gives this rank (main-process loading).
        self.frames.reseed(self.seed, self.rank)
        self._worker_seeded: Optional[int] = None

    def __len__(self) -> int:
        return len(self.layout)

    def _seed_worker_once(self) -> None:
        """Loader workers start from copies of one RNG: each worker process reseeds once from the
        loader's per-epoch worker seed, mixed with the rank (the host seeds every rank alike)."""
        info = get_worker_info()
        if info is not None and self._worker_seeded != info.id:
            self.frames.reseed(self.seed, self.rank, info.seed)
            self._worker_seeded = info.id

    def __getitem__(self, index: int) -> Dict[str, Any]:
        placement = self.layout.place(index)
        if getattr(self.frames, "accepts_draw_keys", False):
            # the draw key streampetr-run's loader uses: same augmentation, whatever the workers
            item = dict(self.frames[(placement.frame, (placement.rank, placement.step, placement.row))])
        else:
            self._seed_worker_once()
            item = dict(self.frames[placement.frame])
        item["scene_idx"] = self.scene_idx[placement.frame]
        item["frame_idx"] = self.frame_idx[placement.frame]
        item["sample_idx"] = torch.tensor(placement.frame, dtype=torch.int64)
        item[PLACEMENT_KEY] = placement
        return item

    def check_placements(self, placements: List[Placement]) -> None:
        """One full step of this rank's layout, rows in order; raises :class:`StreamLayoutError`."""
        rows = [placement.row for placement in placements]
        steps = {placement.step for placement in placements}
        ranks = {placement.rank for placement in placements}
        if rows != list(range(self.layout.micro_batch_size)) or len(steps) != 1 or ranks != {self.rank}:
            raise StreamLayoutError(
                f"rank {self.rank} received frames laid out for ranks {sorted(ranks)}, steps "
                f"{sorted(steps)}, rows {rows} (expected rows 0..{self.layout.micro_batch_size - 1} of one "
                f"step of rank {self.rank}): {LAYOUT_HINT}"
            )

    def collate_fn(self, features: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        """Frames of one step -> the encoded batch (flat dict of non-floating tensors, see :mod:`.codec`)."""
        from streampetr_plugin.data.collate import collate_frames

        self.check_placements([feature.pop(PLACEMENT_KEY) for feature in features])
        batch = collate_frames(features)
        for key in ("scene_idx", "frame_idx", "sample_idx"):
            batch[key] = torch.stack([feature[key] for feature in features])
        return encode_batch(batch)
