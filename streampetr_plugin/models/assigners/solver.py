"""Shared last step of the Hungarian assigners: padded batched costs -> per-sample assignments.

The costs are built on the device; the Hungarian algorithm (scipy) runs on the host. Every matching of
a training step (the 3D head's decoder layers, the 2D head's images) goes to the host in **one**
device-to-host copy (:func:`solve_matchings`): each copy makes the host wait for the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch
from scipy.optimize import linear_sum_assignment

from streampetr_plugin.models.assigners.assign_result import AssignResult


@dataclass
class MatchingProblem:
    """Costs of matching N samples, on the device.

    Fields:
        costs: (N, Q, G_max) cost matrices; columns ``>= num_gts[n]`` of sample n are padding.
        labels: (N, G_max) ground-truth labels, padded like the columns of ``costs``.
        num_gts: number of real ground truths per sample.
    """

    costs: torch.Tensor
    labels: torch.Tensor
    num_gts: List[int]


def solve_matchings(problems: Sequence[MatchingProblem]) -> List[List[AssignResult]]:
    """Solve every problem, with all costs and labels copied to the host together.

    Labels travel as float32 beside the costs (class indices are exact in float32); costs are widened
    to a common floating type, which leaves their values unchanged.

    Returns:
        Per problem, one :class:`AssignResult` per sample (tensors on the CPU).
    """
    dtype = torch.float32
    for problem in problems:
        dtype = torch.promote_types(dtype, problem.costs.dtype)
    parts = [part for p in problems for part in (p.costs.detach().to(dtype), p.labels.to(dtype))]
    host = torch.cat([part.reshape(-1) for part in parts]).cpu()  # the one device -> host copy
    pieces = iter(torch.split(host, [part.numel() for part in parts]))
    results = []
    for problem in problems:
        costs = next(pieces).view(problem.costs.shape)
        labels = next(pieces).view(problem.labels.shape).long()
        results.append(solve_padded_costs(costs, labels, problem.num_gts))
    return results


def solve_padded_costs(
    costs: torch.Tensor, padded_labels: torch.Tensor, num_gts: Sequence[int]
) -> List[AssignResult]:
    """Run ``linear_sum_assignment`` on each sample's slice of padded costs (CPU tensors).

    Args:
        costs: (N, Q, G_max) cost matrices; columns ``>= num_gts[n]`` of sample n are padding.
        padded_labels: (N, G_max) ground-truth labels, padded like the columns of ``costs``.
        num_gts: number of real ground truths per sample.

    Returns:
        One :class:`AssignResult` per sample (tensors on the CPU).
    """
    costs = torch.nan_to_num(costs, nan=100.0, posinf=100.0, neginf=-100.0)  # as the reference clamps
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
