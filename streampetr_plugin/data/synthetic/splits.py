"""Official nuScenes scene names for the synthetic scenes, so the devkit's split logic works unchanged."""
from __future__ import annotations

from typing import List, Tuple

# nuscenes.utils.splits.mini_train / mini_val (copied: importing the devkit takes seconds; a test checks
# that they agree).
MINI_TRAIN_SCENES = (
    "scene-0061", "scene-0553", "scene-0655", "scene-0757",
    "scene-0796", "scene-1077", "scene-1094", "scene-1100",
)
MINI_VAL_SCENES = ("scene-0103", "scene-0916")


def synthetic_version(num_scenes: int) -> str:
    """The nuScenes version whose official scene names a synthetic set of ``num_scenes`` scenes takes:
    v1.0-mini up to its 10 scenes, v1.0-trainval beyond."""
    return "v1.0-mini" if num_scenes <= len(MINI_TRAIN_SCENES) + len(MINI_VAL_SCENES) else "v1.0-trainval"


def official_scene_names(
    version: str, num_scenes: int, extra_train_scenes: int = 0
) -> Tuple[List[str], List[str]]:
    """(training, validation) scene names of ``version``: ``num_scenes`` split 80 / 20, then
    ``extra_train_scenes`` more training names."""
    if version == "v1.0-mini":
        train_pool, val_pool = MINI_TRAIN_SCENES, MINI_VAL_SCENES
    elif version == "v1.0-trainval":
        from nuscenes.utils import splits  # importing the devkit takes seconds: only when needed

        train_pool, val_pool = splits.train, splits.val
    else:
        raise ValueError(f"synthetic nuScenes supports v1.0-mini and v1.0-trainval, not {version!r}")
    if num_scenes < 2:
        raise ValueError("num_scenes must be >= 2 (at least one training and one validation scene)")
    num_val = min(len(val_pool), max(1, round(num_scenes * 0.2)))
    num_train = num_scenes - num_val + extra_train_scenes
    if num_train > len(train_pool):
        raise ValueError(
            f"{version} has {len(train_pool) + len(val_pool)} official scene names; asked for "
            f"{num_scenes + extra_train_scenes} (use version='v1.0-trainval' for more scenes)"
        )
    return list(train_pool[:num_train]), list(val_pool[:num_val])
