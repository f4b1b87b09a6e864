"""Accelerator adapters (see :mod:`streampetr_plugin.adapters.base`); the NPU, CUDA and CPU ones live
in :mod:`.ascend`, :mod:`.cuda`, :mod:`.cpu` and :mod:`.common`, device selection in :mod:`.device`.
Nothing here imports ``torch_npu`` or ``mindspeed`` at import time."""
from streampetr_plugin.adapters.base import (
    Adapter,
    AdapterContext,
    AdapterRecord,
    AdapterResult,
    AdapterRunner,
    Phase,
    Status,
)

__all__ = ["Adapter", "AdapterContext", "AdapterRecord", "AdapterResult", "AdapterRunner", "Phase", "Status"]
