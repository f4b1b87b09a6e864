"""The process layout (torchrun's environment) and the few collectives the trainer uses.

A single process needs nothing; under ``torchrun`` every process reads ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Multi-node runs are
torchrun's rendezvous; nothing here depends on the number of nodes.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

import torch
import torch.distributed as dist

from streampetr_plugin.errors import RunError


class DistributedSetupError(RunError):
    """The launcher's environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: Optional[str] = None
    master_port: Optional[int] = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_variable(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedSetupError(f"{name}={value!r} is not an integer") from None


def read_distributed_env(environ: Optional[Mapping[str, str]] = None) -> DistributedEnv:
    """The layout torchrun (or another launcher) exported; a single process when ``WORLD_SIZE`` is unset."""
    environ = os.environ if environ is None else environ
    world_size = _int_variable(environ, "WORLD_SIZE", 1)
    rank = _int_variable(environ, "RANK", 0)
    local_rank = _int_variable(environ, "LOCAL_RANK", rank if world_size > 1 else 0)
    local_world_size = _int_variable(environ, "LOCAL_WORLD_SIZE", world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedSetupError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    if local_rank < 0:
        raise DistributedSetupError(f"LOCAL_RANK={local_rank} is negative")
    master_addr = environ.get("MASTER_ADDR")
    master_port = _int_variable(environ, "MASTER_PORT", 0) or None
    if world_size > 1 and (master_addr is None or master_port is None):
        raise DistributedSetupError(
            f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set; start the job with torchrun "
            "(torchrun --nproc-per-node N -m streampetr_plugin.cli.run RECIPE)"
        )
    return DistributedEnv(rank, local_rank, world_size, local_world_size, master_addr, master_port)


def init_process_group(env: DistributedEnv, backend: str) -> bool:
    """Join the process group (``env://`` rendezvous); True when this call created it.

    Call it after the process's device is made current. A group that already exists (an embedding
    host created it) is used as it is.
    """
    if not env.is_distributed or dist.is_initialized():
        return False
    # HCCL_CONNECT_TIMEOUT governs HCCL's own link set-up; this bounds every collective.
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=30),
    )
    return True


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity for a single process)."""
    if is_active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(value: Any) -> List[Any]:
    """Every rank's ``value``, in rank order (picklable objects; small ones)."""
    if not is_active():
        return [value]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def destroy_process_group() -> None:
    if is_active():
        dist.destroy_process_group()
