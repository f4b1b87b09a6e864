"""Shared last step of the Hungarian assigners: padded batched costs -> per-sample assignments."""
from __future__ import annotations

from typing import List, Sequence

import torch
from scipy.optimize import linear_sum_assignment

from streampetr_plugin.models.assigners.assign_result import AssignResult


def solve_padded_costs(
    costs: torch.Tensor, padded_labels: torch.Tensor, num_gts: Sequence[int]
) -> List[AssignResult]:
    """Run ``linear_sum_assignment`` on each sample's slice of padded costs.

    Args:
        costs: (N, Q, G_max) cost matrices; columns ``>= num_gts[n]`` of sample n are padding.
        padded_labels: (N, G_max) ground-truth labels, padded like the columns of ``costs``.
        num_gts: number of real ground truths per sample.

    Returns:
        One :class:`AssignResult` per sample (tensors on the CPU).
    """
    # Two device -> host copies for the whole batch; NaN / inf costs are clamped as in the reference.
    costs = torch.nan_to_num(costs.detach().cpu(), nan=100.0, posinf=100.0, neginf=-100.0)
    padded_labels = padded_labels.cpu()
    num_queries = costs.size(1)
    results = []
    for cost, labels, num_gt in zip(costs, padded_labels, num_gts):
        if num_gt == 0 or num_queries == 0:
            results.append(
                AssignResult(
                    num_gts=num_gt,
                    gt_inds=torch.zeros(num_queries, dtype=torch.long),
                    labels=torch.full((num_queries,), -1, dtype=torch.long),
                )
            )
            continue
        query_inds, gt_inds = linear_sum_assignment(cost[:, :num_gt].numpy())
        results.append(
            AssignResult.from_matches(
                num_queries, num_gt, torch.from_numpy(query_inds), torch.from_numpy(gt_inds), labels[:num_gt]
            )
        )
    return results
