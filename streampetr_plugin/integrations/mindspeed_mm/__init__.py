"""StreamPETR inside MindSpeed-MM's plugin-style FSDP2 trainer.

Name this package in the host YAML (``training.plugin: [streampetr_plugin.integrations.mindspeed_mm]``):
the host imports it, and every module below it, before its process group exists. Importing it
registers model id ``streampetr`` and dataset id ``streampetr_nuscenes`` with MindSpeed-MM's
``model_register``/``data_register`` and does nothing else (no device work, no torch_npu).
``docs/mindspeed_mm.md`` has the YAML keys and the launch commands.

This is the only place of ``streampetr_plugin`` that imports ``mindspeed_mm``.
"""

from __future__ import annotations

from typing import Any

try:
    from mindspeed_mm.fsdp.utils.register import data_register, model_register
except ImportError as _missing:
    raise ImportError(
        f"streampetr_plugin.integrations.mindspeed_mm runs inside MindSpeed-MM, which cannot be "
        f"imported here ({_missing}): install MindSpeed-MM and MindSpeed "
        f"(https://gitee.com/ascend/MindSpeed-MM) or remove this package from training.plugin"
    ) from None

from streampetr_plugin.integrations.mindspeed_mm.dataset import StreamPETRNuScenesDataset
from streampetr_plugin.integrations.mindspeed_mm.model import StreamPETRForMindSpeedMM

MODEL_ID = "streampetr"
DATASET_ID = "streampetr_nuscenes"


def _register_once(registry: Any, obj_id: str, obj: type) -> None:
    """Register ``obj``; a re-import of this same module (same qualified name) is a no-op.

    Anything else already under ``obj_id`` still gets the host's duplicate-id ``KeyError``.
    """
    try:
        existing = registry.get(obj_id)
    except KeyError:
        existing = None
    same = existing is not None and (existing.__module__, existing.__qualname__) == (
        obj.__module__,
        obj.__qualname__,
    )
    if not same:
        registry.register(obj_id)(obj)


_register_once(model_register, MODEL_ID, StreamPETRForMindSpeedMM)
_register_once(data_register, DATASET_ID, StreamPETRNuScenesDataset)

__all__ = ["DATASET_ID", "MODEL_ID", "StreamPETRForMindSpeedMM", "StreamPETRNuScenesDataset"]
