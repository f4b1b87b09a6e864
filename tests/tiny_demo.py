"""The CPU demo recipe shrunk to seconds, on the tests' tiny synthetic nuScenes (``tests/data_fixtures.py``),
for tests that drive the command-line entry points."""
from __future__ import annotations

from pathlib import Path
from typing import List

from tests.trainer_helpers import demo_overrides

# 32 channels, 16 queries, a short depth axis.
TINY_MODEL = [
    "model.neck.out_channels=32",
    "model.roi_head.embed_dims=32",
    "model.head.embed_dims=32",
    "model.head.num_query=16",
    "model.head.memory_len=16",
    "model.head.topk_proposals=4",
    "model.head.num_propagated=4",
    "model.head.scalar=2",
    "model.head.depth_num=30",
    "model.head.feedforward_channels=64",
    "model.head.max_num=10",
]


def tiny_demo_overrides(root: Path, version: str, work_dir: Path, max_iters: int = 2) -> List[str]:
    """Overrides of ``demo_cpu`` for ``max_iters`` iterations of the tiny model on the data at ``root``
    (loaded in the main process), writing into ``work_dir``."""
    return [*demo_overrides(root, version), *TINY_MODEL, "data.num_workers=0", f"runtime.work_dir={work_dir}",
            f"runtime.max_iters={max_iters}"]
