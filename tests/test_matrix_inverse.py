"""4x4 inverses that export: the closed form against LU, and which one runs when."""
from __future__ import annotations

import math

import torch

from streampetr_plugin.models.layers.matrix_inverse import adjugate_inverse_4x4, inverse_4x4


def _camera_projections(count: int) -> torch.Tensor:
    """(count, 4, 4) float64 LiDAR -> pixel matrices: a viewpad times a rigid LiDAR -> camera transform."""
    generator = torch.Generator().manual_seed(0)
    matrices = []
    for _ in range(count):
        yaw = float(torch.rand(1, generator=generator)) * 2 * math.pi
        viewpad = torch.eye(4, dtype=torch.float64)
        viewpad[0, 0] = viewpad[1, 1] = 500.0 + 800.0 * float(torch.rand(1, generator=generator))
        viewpad[0, 2], viewpad[1, 2] = 400.0, 160.0
        # LiDAR x forward, z up -> camera z forward, y down, rotated by yaw about the LiDAR z axis.
        axes = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
        turn = torch.tensor(
            [[math.cos(yaw), math.sin(yaw), 0.0], [-math.sin(yaw), math.cos(yaw), 0.0], [0.0, 0.0, 1.0]],
            dtype=torch.float64,
        )
        extrinsic = torch.eye(4, dtype=torch.float64)
        extrinsic[:3, :3] = axes @ turn
        extrinsic[:3, 3] = torch.randn(3, generator=generator, dtype=torch.float64)
        matrices.append(viewpad @ extrinsic)
    return torch.stack(matrices)


def test_adjugate_inverse_equals_lu_on_general_matrices():
    generator = torch.Generator().manual_seed(1)
    matrices = torch.randn(2, 50, 4, 4, generator=generator, dtype=torch.float64) + 3 * torch.eye(
        4, dtype=torch.float64
    )
    torch.testing.assert_close(
        adjugate_inverse_4x4(matrices), torch.linalg.inv(matrices), rtol=1e-10, atol=1e-10
    )


def test_adjugate_inverse_of_camera_projections_is_as_accurate_as_lu_in_float32():
    projections = _camera_projections(12)
    truth = torch.linalg.inv(projections)
    closed_form = adjugate_inverse_4x4(projections.float()).double()
    lu = torch.linalg.inv(projections.float()).double()
    scale = truth.abs().amax(dim=(-2, -1), keepdim=True)
    assert ((closed_form - truth).abs() / scale).max() < 1e-6
    assert ((closed_form - truth).abs() / scale).max() < 4 * ((lu - truth).abs() / scale).max() + 1e-7


def test_eager_code_keeps_lu_and_exporting_uses_the_closed_form(monkeypatch):
    projections = _camera_projections(3).float()
    assert torch.equal(inverse_4x4(projections), torch.linalg.inv(projections))
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert torch.equal(inverse_4x4(projections), adjugate_inverse_4x4(projections))
