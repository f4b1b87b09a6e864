"""The result of a one-to-one assignment of predictions (queries) to ground truths."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AssignResult:
    """Assignment of Q predictions to ``num_gts`` ground truths.

    Attributes:
        num_gts: number of ground truths of the sample.
        gt_inds: (Q,) long; 0 = background, k >= 1 = matched to ground truth k - 1.
        labels: (Q,) long; class of the matched ground truth, -1 for background.
    """

    num_gts: int
    gt_inds: torch.Tensor
    labels: torch.Tensor

    @property
    def pos_inds(self) -> torch.Tensor:
        """(P,) indices of matched predictions, ascending."""
        return torch.nonzero(self.gt_inds > 0).squeeze(-1)

    @property
    def pos_assigned_gt_inds(self) -> torch.Tensor:
        """(P,) 0-based ground-truth index of each entry of ``pos_inds``."""
        return self.gt_inds[self.pos_inds] - 1

    @classmethod
    def from_matches(
        cls,
        num_queries: int,
        num_gts: int,
        query_inds: torch.Tensor,
        gt_inds: torch.Tensor,
        gt_labels: torch.Tensor,
    ) -> "AssignResult":
        """Build from matched pairs ``(query_inds[i], gt_inds[i])``; every other query is background.

        All inputs are CPU tensors; ``gt_labels`` (G,) holds the class of each ground truth.
        """
        assigned = torch.zeros(num_queries, dtype=torch.long)
        labels = torch.full((num_queries,), -1, dtype=torch.long)
        assigned[query_inds] = gt_inds + 1
        labels[query_inds] = gt_labels.long()[gt_inds]
        return cls(num_gts=num_gts, gt_inds=assigned, labels=labels)
