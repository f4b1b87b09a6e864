"""The streaming memory queue of StreamPETR: an explicit state object, not module state.

Between frames the memory holds, per batch row (one stream each), ``capacity + topk`` rows:

==================  ===================  =====================================================
field               shape, dtype         meaning between frames
==================  ===================  =====================================================
``embedding``       (B, R, C) f32        last-layer decoder output of the remembered query
``reference_point`` (B, R, 3) f32        predicted centre, **global** frame, metres
``timestamp``       (B, R, 1) **f64**    minus the absolute time (s) of the frame that wrote it;
                                         with ``relative_time``: f32, the row's age (s) at the last
                                         frame
``egopose``         (B, R, 4, 4) f32     row's own LiDAR frame -> global
``velo``            (B, R, 2) f32        predicted (vx, vy), m/s, never rotated
==================  ===================  =====================================================

:meth:`StreamingMemory.pre_update` maps it into the current frame (ages in seconds, points and poses
relative to the current LiDAR frame), keeps the newest ``capacity`` rows, zeroes rows whose stream
restarted and seeds them with the pseudo reference points; :meth:`StreamingMemory.post_update`
prepends the top-k queries of the frame and maps everything back to global. The order of operations
and the float32 global-frame algebra are the reference's, which its numbers depend on.
:meth:`save` / :meth:`load` use the fixture layout (the names above).

Time has two representations. The reference's (the default) keeps absolute seconds, which need
float64. With ``relative_time`` the time origin moves to each frame: the frame's ``timestamp`` is the
seconds since the stream's previous frame, :meth:`pre_update` adds it to the stored ages exactly as the
reference adds the absolute time, and :meth:`post_update` leaves the ages relative to the frame just
processed, so everything stays float32 (what an exported graph needs: TensorRT and Ascend ATC reject
float64). Both give the same ages up to float32 rounding.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

MEMORY_FIELDS = ("embedding", "reference_point", "timestamp", "egopose", "velo")


def transform_points(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply per-row 4x4 ``matrix`` (B, 4, 4) to ``points`` (B, R, 3) in homogeneous form -> (B, R, 3)."""
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)  # (B, R, 4)
    return (matrix.unsqueeze(1) @ homogeneous.unsqueeze(-1)).squeeze(-1)[..., :3]


class StreamingMemory:
    """Memory queue state of a batch of streams.

    Args:
        capacity: rows kept from one frame to the next (reference ``memory_len``, 1024).
        embed_dims: C.
        relative_time: keep ages relative to the last frame in float32 (see the module docstring)
            instead of the reference's absolute float64 times.
    """

    def __init__(self, *, capacity: int, embed_dims: int, relative_time: bool = False) -> None:
        self.capacity = capacity
        self.embed_dims = embed_dims
        self.relative_time = relative_time
        self.time_dtype = torch.float32 if relative_time else torch.float64
        self.embedding: Optional[torch.Tensor] = None
        self.reference_point: Optional[torch.Tensor] = None
        self.timestamp: Optional[torch.Tensor] = None
        self.egopose: Optional[torch.Tensor] = None
        self.velo: Optional[torch.Tensor] = None

    @property
    def is_empty(self) -> bool:
        return self.embedding is None

    @property
    def batch_size(self) -> Optional[int]:
        return None if self.embedding is None else self.embedding.size(0)

    def reset(self) -> None:
        """Forget everything; the next :meth:`pre_update` starts every stream afresh."""
        for name in MEMORY_FIELDS:
            setattr(self, name, None)

    def pre_update(
        self,
        *,
        prev_exists: torch.Tensor,
        timestamp: torch.Tensor,
        ego_pose_inv: torch.Tensor,
        pseudo_reference_points: Optional[torch.Tensor] = None,
    ) -> None:
        """Bring the memory into the current frame.

        Args:
            prev_exists: (B,) 1 where the stream continues, 0 where it (re)starts.
            timestamp: (B,) float64 seconds of the current frame; with ``relative_time`` float32
                seconds since the stream's previous frame.
            ego_pose_inv: (B, 4, 4) global -> current LiDAR.
            pseudo_reference_points: (P, 3) metric points put into the first P rows of restarted
                streams (with identity poses), or None.
        """
        batch = prev_exists.size(0)
        device = prev_exists.device
        if self.embedding is None:
            self.embedding = prev_exists.new_zeros(batch, self.capacity, self.embed_dims)
            self.reference_point = prev_exists.new_zeros(batch, self.capacity, 3)
            self.timestamp = torch.zeros(batch, self.capacity, 1, dtype=self.time_dtype, device=device)
            self.egopose = prev_exists.new_zeros(batch, self.capacity, 4, 4)
            self.velo = prev_exists.new_zeros(batch, self.capacity, 2)
        else:
            if self.embedding.size(0) != batch:
                raise ValueError(
                    f"memory holds {self.embedding.size(0)} streams but the frame has {batch}; reset it first"
                )
            self.timestamp = self.timestamp + timestamp.to(self.time_dtype).view(batch, 1, 1)
            self.egopose = ego_pose_inv.unsqueeze(1) @ self.egopose
            self.reference_point = transform_points(self.reference_point, ego_pose_inv)
            keep = prev_exists.view(batch, 1, 1)
            self.timestamp = self.timestamp[:, : self.capacity] * keep.to(self.time_dtype)
            self.reference_point = self.reference_point[:, : self.capacity] * keep
            self.embedding = self.embedding[:, : self.capacity] * keep
            self.egopose = self.egopose[:, : self.capacity] * keep.unsqueeze(-1)
            self.velo = self.velo[:, : self.capacity] * keep
        if pseudo_reference_points is not None:
            num_pseudo = pseudo_reference_points.size(0)
            restart = (1 - prev_exists).view(batch, 1, 1)
            self.reference_point = torch.cat(
                [
                    self.reference_point[:, :num_pseudo] + restart * pseudo_reference_points,
                    self.reference_point[:, num_pseudo:],
                ],
                dim=1,
            )
            identity = torch.eye(4, dtype=self.egopose.dtype, device=device)
            seeded_poses = self.egopose[:, :num_pseudo] + restart.unsqueeze(-1) * identity
            self.egopose = torch.cat([seeded_poses, self.egopose[:, num_pseudo:]], dim=1)

    def post_update(
        self,
        *,
        embedding: torch.Tensor,
        reference_point: torch.Tensor,
        velo: torch.Tensor,
        scores: torch.Tensor,
        topk: int,
        timestamp: torch.Tensor,
        ego_pose: torch.Tensor,
    ) -> None:
        """Prepend the ``topk`` best queries of this frame (detached) and move the memory to global.

        Args:
            embedding: (B, Q, C) last-layer decoder outputs.
            reference_point: (B, Q, 3) predicted centres, metres, current LiDAR frame.
            velo: (B, Q, 2) predicted velocities.
            scores: (B, Q) ranking score (max class probability of the last layer).
            topk: number of queries to remember.
            timestamp: (B,) float64 seconds of the current frame (not read with ``relative_time``:
                the ages stay relative to this frame).
            ego_pose: (B, 4, 4) current LiDAR -> global.
        """
        batch = scores.size(0)
        index = torch.topk(scores, topk, dim=1).indices  # (B, K)

        def gather(rows: torch.Tensor) -> torch.Tensor:
            return torch.gather(rows, 1, index.view(batch, topk, 1).expand(-1, -1, rows.size(-1)))

        new_embedding = gather(embedding).detach()
        new_reference_point = gather(reference_point).detach()
        new_velo = gather(velo).detach()
        new_timestamp = torch.zeros(batch, topk, 1, dtype=self.time_dtype, device=scores.device)
        new_egopose = torch.eye(4, dtype=self.egopose.dtype, device=scores.device).expand(batch, topk, 4, 4)

        self.embedding = torch.cat([new_embedding, self.embedding], dim=1)
        self.timestamp = torch.cat([new_timestamp, self.timestamp], dim=1)
        self.egopose = torch.cat([new_egopose, self.egopose], dim=1)
        reference_point = torch.cat([new_reference_point, self.reference_point], dim=1)
        self.velo = torch.cat([new_velo, self.velo], dim=1)
        self.reference_point = transform_points(reference_point, ego_pose)
        if not self.relative_time:
            self.timestamp = self.timestamp - timestamp.to(torch.float64).view(batch, 1, 1)
        self.egopose = ego_pose.unsqueeze(1) @ self.egopose

    def save(self) -> Dict[str, torch.Tensor]:
        """The state as ``{field: (B, R, ...) tensor}`` (clones); empty dict when empty."""
        if self.embedding is None:
            return {}
        return {name: getattr(self, name).clone() for name in MEMORY_FIELDS}

    def load(self, state: Dict[str, torch.Tensor]) -> None:
        """Replace the state. Accepts :meth:`save`'s layout or one stream without the batch dimension
        (``embedding`` (R, C), ``reference_point`` (R, 3), ``timestamp`` (R, 1), ``egopose`` (R, 4, 4),
        ``velo`` (R, 2)); ``timestamp`` is kept in the memory's time dtype."""
        missing = [name for name in MEMORY_FIELDS if name not in state]
        if missing:
            raise KeyError(f"memory state lacks {missing}")
        unbatched = state["embedding"].dim() == 2
        for name in MEMORY_FIELDS:
            value = state[name].clone()
            if unbatched:
                value = value.unsqueeze(0)
            if name == "timestamp":
                value = value.to(self.time_dtype)
            setattr(self, name, value)
