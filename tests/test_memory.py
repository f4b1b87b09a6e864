"""The streaming memory's relative-time representation against the reference's absolute float64 times."""
from __future__ import annotations

import math

import torch

from streampetr_plugin.models.layers.memory import MEMORY_FIELDS, StreamingMemory

CAPACITY, TOPK, QUERIES, CHANNELS, STREAMS = 6, 2, 5, 3, 2


def _pose(x: float, y: float, yaw: float) -> torch.Tensor:
    pose = torch.eye(4)
    pose[:2, :2] = torch.tensor([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
    pose[:2, 3] = torch.tensor([x, y])
    return pose


def _run_frame(
    memory: StreamingMemory, *, frame: int, timestamp: torch.Tensor, prev_exists: torch.Tensor
) -> None:
    """One frame of both streams with seeded queries; ``timestamp`` in the memory's own convention."""
    generator = torch.Generator().manual_seed(frame)
    poses = torch.stack(
        [_pose(1500.0 + 4.0 * frame + 50 * b, 900.0 - 3.0 * frame, 0.1 * frame + b) for b in range(STREAMS)]
    )
    memory.pre_update(
        prev_exists=prev_exists,
        timestamp=timestamp,
        ego_pose_inv=torch.linalg.inv(poses),
        pseudo_reference_points=torch.rand(TOPK, 3, generator=generator) * 10,
    )
    memory.post_update(
        embedding=torch.randn(STREAMS, QUERIES, CHANNELS, generator=generator),
        reference_point=torch.randn(STREAMS, QUERIES, 3, generator=generator) * 20,
        velo=torch.randn(STREAMS, QUERIES, 2, generator=generator),
        scores=torch.rand(STREAMS, QUERIES, generator=generator),
        topk=TOPK,
        timestamp=timestamp,
        ego_pose=poses,
    )


def test_relative_ages_equal_the_absolute_ones_and_stay_float32():
    # Irregular frame times near nuScenes' absolute seconds; stream 1 restarts at frame 3.
    times = torch.tensor(
        [
            1.5331516e9,
            1.5331516e9 + 0.5,
            1.5331516e9 + 1.05,
            1.5331516e9 + 1.5,
            1.5331516e9 + 2.0,
            1.5331516e9 + 2.45,
        ],
        dtype=torch.float64,
    )
    prev_exists = [torch.tensor([0.0, 0.0])] + [torch.tensor([1.0, 1.0])] * 5
    prev_exists[3] = torch.tensor([1.0, 0.0])
    absolute = StreamingMemory(capacity=CAPACITY, embed_dims=CHANNELS)
    relative = StreamingMemory(capacity=CAPACITY, embed_dims=CHANNELS, relative_time=True)
    for frame, now in enumerate(times):
        delta = (now - times[frame - 1]).float() if frame else torch.tensor(0.0)
        _run_frame(absolute, frame=frame, timestamp=now.expand(STREAMS), prev_exists=prev_exists[frame])
        _run_frame(relative, frame=frame, timestamp=delta.expand(STREAMS), prev_exists=prev_exists[frame])
        assert relative.timestamp.dtype == torch.float32
        # After the frame, the reference holds minus the writing time; the relative memory the age now.
        ages = absolute.timestamp + now
        torch.testing.assert_close(relative.timestamp.double(), ages, atol=1e-6, rtol=0)
        for field in MEMORY_FIELDS:
            if field != "timestamp":
                assert torch.equal(getattr(relative, field), getattr(absolute, field)), field
    # Capacity plus top-k rows hold the last four frames' queries: the oldest were written at frame 2.
    assert abs(float(relative.timestamp.max()) - float(times[-1] - times[2])) < 1e-6


def test_relative_memory_loads_times_as_float32_and_checks_its_state():
    memory = StreamingMemory(capacity=2, embed_dims=1, relative_time=True)
    state = {
        "embedding": torch.zeros(2, 1),
        "reference_point": torch.zeros(2, 3),
        "timestamp": torch.zeros(2, 1, dtype=torch.float64),
        "egopose": torch.zeros(2, 4, 4),
        "velo": torch.zeros(2, 2),
    }
    memory.load(state)
    assert memory.timestamp.dtype == torch.float32 and memory.timestamp.shape == (1, 2, 1)
