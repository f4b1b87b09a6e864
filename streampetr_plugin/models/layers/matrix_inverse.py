"""Inverse of batched 4x4 matrices that also exports to plain ONNX operators.

ONNX has no matrix inverse (onnxruntime's is a contrib operator; TensorRT and Ascend ATC have none), so
while a graph is being exported (``torch.compiler.is_exporting()``) the inverse is the adjugate over the
determinant, by cofactor expansion over the 2x2 minors of the row pairs (0, 1) and (2, 3): gathers,
multiplications and additions only. Eager code keeps ``torch.linalg.inv`` (LU), the reference's numbers;
the two agree to float32 rounding on camera projection matrices.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

_COLUMN_PAIRS: Tuple[Tuple[int, int], ...] = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def _cofactor_tables() -> Tuple[List[List[int]], List[List[int]], List[float]]:
    """Index tables of the adjugate, row-major: entry (r, c) is the cofactor of matrix element (c, r),
    ``sign * (a[o, p] M(q, w) - a[o, q] M(p, w) + a[o, w] M(p, q))`` with (p, q, w) the columns other than
    r, o the row paired with c ((0, 1) or (2, 3)) and M the 2x2 minors of the other row pair.

    Returns, per entry, the three flat indices of ``a[o, .]`` (into the 16 elements), the three minors
    (into the 6 minors of rows (0, 1) followed by the 6 of rows (2, 3)) and the sign (-1)^(r + c).
    """
    pair_index = {pair: index for index, pair in enumerate(_COLUMN_PAIRS)}
    elements, minors, signs = [], [], []
    for row in range(4):
        p, q, w = [column for column in range(4) if column != row]
        for column in range(4):
            paired_row = column ^ 1  # 0 <-> 1, 2 <-> 3
            offset = 6 if column < 2 else 0  # the minors of the row pair that does not hold `column`
            elements.append([4 * paired_row + p, 4 * paired_row + q, 4 * paired_row + w])
            minors.append(
                [offset + pair_index[(q, w)], offset + pair_index[(p, w)], offset + pair_index[(p, q)]]
            )
            signs.append(float((-1) ** (row + column)))
    return elements, minors, signs


_ELEMENTS, _MINORS, _SIGNS = _cofactor_tables()


def inverse_4x4(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of ``matrix`` (..., 4, 4); closed form while exporting, LU otherwise."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # absent in older torch releases
    if is_exporting is not None and is_exporting():
        return adjugate_inverse_4x4(matrix)
    return torch.linalg.inv(matrix)


def adjugate_inverse_4x4(matrix: torch.Tensor) -> torch.Tensor:
    """``adj(matrix) / det(matrix)`` of (..., 4, 4) matrices."""
    device = matrix.device
    first, second = torch.tensor(_COLUMN_PAIRS, device=device).unbind(-1)  # (6,) each
    rows = matrix.unbind(-2)  # 4 x (..., 4)

    def pair_minors(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        return upper[..., first] * lower[..., second] - lower[..., first] * upper[..., second]  # (..., 6)

    minors = torch.cat([pair_minors(rows[0], rows[1]), pair_minors(rows[2], rows[3])], dim=-1)  # (..., 12)
    terms = (
        matrix.flatten(-2)[..., torch.tensor(_ELEMENTS, device=device)]
        * minors[..., torch.tensor(_MINORS, device=device)]
    )  # (..., 16, 3)
    adjugate = torch.tensor(_SIGNS, dtype=matrix.dtype, device=device) * (
        terms[..., 0] - terms[..., 1] + terms[..., 2]
    )
    adjugate = adjugate.unflatten(-1, (4, 4))
    determinant = (matrix[..., 0, :] * adjugate[..., :, 0]).sum(-1)  # first row times its cofactors
    return adjugate / determinant[..., None, None]
