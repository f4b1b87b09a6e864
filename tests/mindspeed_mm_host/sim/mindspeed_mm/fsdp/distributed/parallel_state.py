"""SIMULATION of ``mindspeed_mm/fsdp/distributed/parallel_state.py``: the process groups the trainer uses.

Only data parallelism exists here: the DP group is the world group; the FSDP group (used by the
gradient-norm all-reduce) is the world group when ``fully_shard_parallel_size > 1``, else absent.
"""

from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist


@dataclass
class ParallelState:
    fully_shard_parallel_size: int
    data_parallel_size: int

    def get_dp_group(self) -> Any:
        return dist.group.WORLD

    def get_fsdp_group(self) -> Optional[Any]:
        return dist.group.WORLD if self.fully_shard_parallel_size > 1 else None


_STATE: Optional[ParallelState] = None


def init_parallel_state(**parallel: Any) -> ParallelState:
    global _STATE
    _STATE = ParallelState(int(parallel["fully_shard_parallel_size"]), int(parallel["data_parallel_size"]))
    return _STATE


def get_parallel_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError("parallel state is not initialised")
    return _STATE
