"""SIMULATION of MindSpeed's ``mindspeed/fsdp/utils/log.py`` (#21): rank-0-only logging.

``print_rank(fn, msg)`` calls ``fn`` on global rank 0 only; before the process group exists the
rank comes from ``RANK``. ``set_log_level`` installs the host's record format.
"""

import logging
import os
from typing import Callable

import torch.distributed as dist

LOG_FORMAT = (
    "[Rank {rank} | Local Rank {local_rank}] %(asctime)s %(levelname)s [%(name)s:%(lineno)d] => %(message)s"
)


def global_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def print_rank(fn: Callable[[str], None], message: str) -> None:
    if global_rank() == 0:
        fn(message)


def print_rank0(message: str) -> None:
    print_rank(print, message)


def set_log_level(level: int = logging.INFO) -> None:
    fmt = LOG_FORMAT.format(rank=os.environ.get("RANK", "0"), local_rank=os.environ.get("LOCAL_RANK", "0"))
    logging.basicConfig(level=level, format=fmt)
