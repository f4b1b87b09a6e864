"""Query denoising of StreamPETR training (the reference's ``prepare_for_dn``).

Ground-truth centres, repeated in ``num_groups`` groups and jittered by up to half the box size, become
extra queries in front of the learnable ones; the decoder must reconstruct the boxes. There is no
label embedding on the query side: "label noise" relabels the *target* of a copy to background when
its jitter vector ``u`` (uniform in [-1, 1)^3) has ``||u|| > split``.

Layout (``pad = num_groups * max_b n_b``): reference points per row are ``[dn (pad) | learnable (Q)]``;
group ``g`` of sample ``b`` fills rows ``g * single_pad + [0, n_b)``, the rest of its slot stays (0, 0, 0).
Queries of the decoder are ``[dn | learnable | propagated (P)]``, self-attention keys
``[dn | learnable | memory (M = P + rest)]``. The self-attention mask (True = blocked):

* learnable and propagated queries see no dn query;
* a dn query sees only its own group among the dn columns, and every non-dn column.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from streampetr_plugin.models.layers.functional import upload


@dataclass
class DenoisingQueries:
    """What :func:`build_denoising_queries` returns.

    Fields:
        reference_points: (B, pad + Q, 3) normalised to ``pc_range``.
        attn_mask: (pad + Q + P, pad + Q + M) bool, True = blocked; None when ``pad == 0``.
        mask_dict: the reference's ``mask_dict`` (read by the criterion):
            ``known_indice`` (G * T,) index of each dn copy's GT in the concatenated batch GT;
            ``batch_idx`` (T,) batch row of each GT; ``map_known_indice`` (G * T,) query row of each
            copy; ``known_lbs_bboxes`` (labels (G * T,) with background = num_classes for relabelled
            copies, boxes (G * T, 9) the original GT); ``know_idx`` list of per-sample ones;
            ``pad_size`` int. The head adds ``output_known_lbs_bboxes`` after the decoder.
    """

    reference_points: torch.Tensor
    attn_mask: Optional[torch.Tensor]
    mask_dict: Dict[str, Any]


def denoising_attention_mask(
    *,
    single_pad: int,
    num_groups: int,
    num_query: int,
    num_propagated: int,
    memory_len: int,
    device: torch.device,
) -> torch.Tensor:
    """The (pad + Q + P, pad + Q + M) boolean self-attention mask, True = blocked."""
    pad_size = single_pad * num_groups
    rows = torch.arange(pad_size + num_query + num_propagated, device=device)
    cols = torch.arange(pad_size + num_query + memory_len, device=device)
    row_is_dn = rows[:, None] < pad_size
    col_is_dn = cols[None, :] < pad_size
    other_group = (rows[:, None] // max(single_pad, 1)) != (cols[None, :] // max(single_pad, 1))
    return col_is_dn & (~row_is_dn | other_group)


def build_denoising_queries(
    *,
    gt_bboxes_3d: Sequence[torch.Tensor],
    gt_labels_3d: Sequence[torch.Tensor],
    reference_points: torch.Tensor,
    num_query: int,
    pc_range: torch.Tensor,
    num_classes: int,
    num_groups: int,
    noise_scale: float,
    noise_trans: float,
    split: float,
    num_propagated: int,
    memory_len: int,
    generator: Optional[torch.Generator] = None,
) -> DenoisingQueries:
    """Denoising queries for a batch.

    Args:
        gt_bboxes_3d: per sample (n_b, 9+) boxes, gravity-centre z: (x, y, z, dx, dy, dz, yaw, vx, vy).
        gt_labels_3d: per sample (n_b,) class indices.
        reference_points: (Q, 3) learnable reference points, normalised.
        num_query: Q.
        pc_range: (6,) [x_min, y_min, z_min, x_max, y_max, z_max].
        num_classes: index used for background targets.
        num_groups: number of noised copies of every GT (reference ``scalar``).
        noise_scale: centre jitter in units of half the box size.
        noise_trans: added to half the box size before scaling.
        split: copies whose jitter norm exceeds this get a background target.
        num_propagated, memory_len: P and M, for the mask's extent.
        generator: RNG for the jitter (the global one when None).
    """
    device = reference_points.device
    batch_size = len(gt_bboxes_3d)
    known_num = [int(boxes.size(0)) for boxes in gt_bboxes_3d]
    boxes = torch.cat([b.to(device=device, dtype=reference_points.dtype) for b in gt_bboxes_3d])  # (T, 9)
    labels = torch.cat([lbl.to(device) for lbl in gt_labels_3d]).long()  # (T,)
    batch_idx = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(known_num)])  # (T,)
    batch_idx = upload(batch_idx, device)
    total = boxes.size(0)

    known_indice = torch.arange(total, device=device).repeat(num_groups)  # (G * T,) group-major
    known_labels = labels.repeat(num_groups)
    known_bid = batch_idx.repeat(num_groups)
    known_bboxs = boxes.repeat(num_groups, 1)  # (G * T, 9)
    centers = known_bboxs[:, :3].clone()
    half_size = known_bboxs[:, 3:6] / 2 + noise_trans
    jitter = torch.rand(centers.shape, generator=generator, device=device, dtype=centers.dtype) * 2 - 1.0
    if noise_scale > 0:
        centers = centers + jitter * half_size * noise_scale
        known_labels = torch.where(
            torch.norm(jitter, 2, 1) > split, torch.full_like(known_labels, num_classes), known_labels
        )
    centers = ((centers - pc_range[0:3]) / (pc_range[3:6] - pc_range[0:3])).clamp(min=0.0, max=1.0)

    single_pad = max(known_num, default=0)
    pad_size = single_pad * num_groups
    padded = torch.cat([reference_points.new_zeros(pad_size, 3), reference_points], dim=0)
    padded = padded.unsqueeze(0).repeat(batch_size, 1, 1)  # (B, pad + Q, 3)
    within_sample = upload(torch.cat([torch.arange(n) for n in known_num]).long(), device)  # (T,)
    map_known_indice = torch.cat([within_sample + single_pad * g for g in range(num_groups)])  # (G * T,)
    if total:
        padded[known_bid, map_known_indice] = centers

    attn_mask = None
    if pad_size > 0:
        attn_mask = denoising_attention_mask(
            single_pad=single_pad,
            num_groups=num_groups,
            num_query=num_query,
            num_propagated=num_propagated,
            memory_len=memory_len,
            device=device,
        )
    know_idx: List[torch.Tensor] = [torch.ones_like(lbl, device=device) for lbl in gt_labels_3d]
    mask_dict = {
        "known_indice": known_indice,
        "batch_idx": batch_idx,
        "map_known_indice": map_known_indice,
        "known_lbs_bboxes": (known_labels, known_bboxs),
        "know_idx": know_idx,
        "pad_size": pad_size,
    }
    return DenoisingQueries(reference_points=padded, attn_mask=attn_mask, mask_dict=mask_dict)
