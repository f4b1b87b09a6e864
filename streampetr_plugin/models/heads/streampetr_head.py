"""The StreamPETR 3D detection head: 3D position embedding, memory queue, temporal decoder, predictions.

Per frame (batch-first shapes, B streams, N cameras, feature map h x w, L = N h w image tokens,
Q learnable queries, P propagated, M memory rows kept, D depth bins, C channels):

1. the memory of the stream state it is handed is brought into the current frame
   (:class:`StreamingMemory.pre_update`);
2. image tokens (B, L, C) get a 3D position embedding from frustum points through the inverse of
   ``lidar2img`` at D LID depths (normalised by ``position_range``), are embedded and modulated by the
   camera "cone" (MLN), and gate the position embedding (``featurized_pe``);
3. learnable reference points (and, in training, denoising copies of the GT) become queries; queries
   and memory rows are modulated by their ego-motion codes (MLN) and get a time embedding; the P most
   recent memory rows are appended as queries, the other M - P are extra self-attention keys;
4. the 6-layer decoder runs; one classification branch and one regression branch, **shared by all
   layers** (the reference's modules), predict per layer logits and boxes
   ``(cx, cy, cz, log dx, log dy, log dz, sin, cos, vx, vy)`` with centres in metres (gravity z), every
   layer refining the same initial reference points;
5. the top-k queries of the last layer are written to the memory (:meth:`StreamingMemory.post_update`).

State-dict keys equal the reference's ``pts_bbox_head.*``. The memory is not part of the head: the
caller owns the :class:`~streampetr_plugin.models.stream_state.StreamState` (the detector's
``stream_state``) and hands it to every :meth:`StreamPETRHead.forward`, which reads and writes it.
Geometry (inverses, frustum points, memory transforms) always runs in float32 and timestamps in
float64, whatever autocast the caller enables.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from streampetr_plugin.models.assigners.assign_result import AssignResult
from streampetr_plugin.models.assigners.solver import MatchingProblem
from streampetr_plugin.models.coders.nms_free_coder import NMSFreeCoder
from streampetr_plugin.models.layers.denoising import build_denoising_queries
from streampetr_plugin.models.layers.functional import bias_init_with_prob, device_constant, inverse_sigmoid
from streampetr_plugin.models.layers.matrix_inverse import inverse_4x4
from streampetr_plugin.models.layers.memory import StreamingMemory
from streampetr_plugin.models.layers.positional_encoding import (
    MLN,
    SELayerLinear,
    nerf_positional_encoding,
    pos2posemb1d,
    pos2posemb3d,
)
from streampetr_plugin.models.layers.transformer import PETRTemporalTransformer
from streampetr_plugin.models.losses.geometric_alignment import alignment_loss
from streampetr_plugin.models.losses.streampetr_criterion import (
    StreamPETRCriterion,
    StreamPETRCriterionParams,
)
from streampetr_plugin.models.stream_state import StreamState

PC_RANGE = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]
POSITION_RANGE = [-61.2, -61.2, -10.0, 61.2, 61.2, 10.0]
CODE_WEIGHTS = [2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
CODE_SIZE = 10
CONE_BIN_FROM_END = 30  # the reference's cone takes coords3d[..., -90:-87]: bin D - 30 (34 of 64)
EGO_MOTION_CODE_SIZE = 15  # (vx, vy, age, 3x4 pose)
NERF_OCTAVES = 6


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Disable autocast inside (geometry and memory algebra must stay float32 / float64)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def lid_depth_bins(*, depth_num: int, depth_start: float, depth_max: float, lid: bool) -> torch.Tensor:
    """Depth of every bin (depth_num,) float32: LID ``start + (max - start) i (i + 1) / (n (n + 1))`` or
    uniform ``start + (max - start) i / n``."""
    index = torch.arange(depth_num, dtype=torch.float32)
    depth_max_t = torch.tensor(depth_max, dtype=torch.float32)  # the reference reads it from a float32 tensor
    if lid:
        bin_size = (depth_max_t - depth_start) / (depth_num * (1 + depth_num))
        return depth_start + bin_size * index * (index + 1)
    bin_size = (depth_max_t - depth_start) / depth_num
    return depth_start + bin_size * index


@dataclass
class StreamPETRHeadOutputs:
    """What :meth:`StreamPETRHead.forward` returns for one frame (Q learnable queries, P propagated).

    Fields:
        all_cls_scores: (layers, B, Q + P, num_classes) logits of every decoder layer.
        all_bbox_preds: (layers, B, Q + P, 10) box codes of every decoder layer, centres in metres.
        query_ids: (B, Q + P) int64 (:class:`QueryIdentities`: a propagated query keeps the id of the query
            that wrote its memory row), or None for predictions made elsewhere.
        dn_mask_dict: in training with denoising, the denoising mask dict with ``output_known_lbs_bboxes`` =
            (cls (layers, B, pad, C), boxes (layers, B, pad, 10)); else None.
        geometric_guidance: in training with ``geometric_guidance_weight`` > 0, the alignment loss and the
            attention share on the target tokens; else None.
    """

    all_cls_scores: torch.Tensor
    all_bbox_preds: torch.Tensor
    query_ids: Optional[torch.Tensor] = None
    dn_mask_dict: Optional[Dict[str, Any]] = None
    geometric_guidance: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


class StreamPETRHead(nn.Module):
    """StreamPETR head (see the module docstring).

    Args:
        params: the user settings (read from ``self.params`` afterwards).
        in_channels: channels of the neck level fed to the head.
        num_classes: number of object classes.
    """

    def __init__(self, params: StreamPETRHeadParams, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if params.num_propagated > params.memory_len or (
            params.topk_proposals > params.num_query + params.num_propagated
        ):
            raise ValueError(
                "need num_propagated <= memory_len and topk_proposals <= num_query + num_propagated"
            )
        self.params = params
        self.num_classes = num_classes
        embed_dims = params.embed_dims

        # Configuration kept as frozen parameters because the reference's state dict has them.
        self.code_weights = nn.Parameter(
            torch.tensor(params.code_weights, dtype=torch.float32), requires_grad=False
        )
        match_costs = params.match_costs if params.match_costs is not None else params.code_weights
        self.match_costs = nn.Parameter(torch.tensor(match_costs, dtype=torch.float32), requires_grad=False)
        self.pc_range = nn.Parameter(torch.tensor(params.pc_range, dtype=torch.float32), requires_grad=False)
        self.position_range = nn.Parameter(
            torch.tensor(params.position_range, dtype=torch.float32), requires_grad=False
        )
        self.coords_d = nn.Parameter(
            lid_depth_bins(
                depth_num=params.depth_num,
                depth_start=params.depth_start,
                depth_max=params.position_range[3],
                lid=params.LID,
            ),
            requires_grad=False,
        )

        cls_layers: List[nn.Module] = []
        reg_layers: List[nn.Module] = []
        for _ in range(params.num_reg_fcs):
            cls_layers += [nn.Linear(embed_dims, embed_dims), nn.LayerNorm(embed_dims), nn.ReLU(inplace=True)]
            reg_layers += [nn.Linear(embed_dims, embed_dims), nn.ReLU()]
        cls_branch = nn.Sequential(*cls_layers, nn.Linear(embed_dims, num_classes))
        reg_branch = nn.Sequential(*reg_layers, nn.Linear(embed_dims, CODE_SIZE))
        # One module in every slot: all decoder layers share their prediction branches (reference).
        self.cls_branches = nn.ModuleList([cls_branch] * params.num_layers)
        self.reg_branches = nn.ModuleList([reg_branch] * params.num_layers)

        self.position_encoder = nn.Sequential(
            nn.Linear(params.depth_num * 3, embed_dims * 4), nn.ReLU(), nn.Linear(embed_dims * 4, embed_dims)
        )
        self.memory_embed = nn.Sequential(
            nn.Linear(in_channels, embed_dims), nn.ReLU(), nn.Linear(embed_dims, embed_dims)
        )
        self.featurized_pe = SELayerLinear(channels=embed_dims)
        self.reference_points = nn.Embedding(params.num_query, 3)
        if params.num_propagated > 0:
            self.pseudo_reference_points = nn.Embedding(params.num_propagated, 3)
        self.query_embedding = nn.Sequential(
            nn.Linear(embed_dims * 3 // 2, embed_dims), nn.ReLU(), nn.Linear(embed_dims, embed_dims)
        )
        self.spatial_alignment = MLN(c_dim=8, f_dim=embed_dims)
        self.time_embedding = nn.Sequential(nn.Linear(embed_dims, embed_dims), nn.LayerNorm(embed_dims))
        if params.with_ego_pos:
            nerf_size = NERF_OCTAVES * 2 * EGO_MOTION_CODE_SIZE
            self.ego_pose_pe = MLN(c_dim=nerf_size, f_dim=embed_dims)
            self.ego_pose_memory = MLN(c_dim=nerf_size, f_dim=embed_dims)
        self.transformer = PETRTemporalTransformer(
            num_layers=params.num_layers,
            embed_dims=embed_dims,
            num_heads=params.num_heads,
            feedforward_channels=params.feedforward_channels,
            dropout=params.dropout,
            attention_backend=params.attention_backend,
            with_cp=params.with_cp,
        )
        self._init_weights()

        # Not modules: no parameters or buffers, so nothing outside the reference's keys.
        self.bbox_coder = NMSFreeCoder(
            pc_range=params.pc_range,
            post_center_range=params.post_center_range,
            max_num=params.max_num,
            score_threshold=params.score_threshold,
            num_classes=num_classes,
            nms_radius=params.nms_radius,
        )
        self.criterion = StreamPETRCriterion(
            params.criterion,
            num_classes=num_classes,
            match_with_velo=params.match_with_velo,
            with_dn=params.with_dn,
            dn_weight=params.dn_weight,
            split=params.split,
        )

    def _init_weights(self) -> None:
        nn.init.uniform_(self.reference_points.weight, 0, 1)
        if self.params.num_propagated > 0:
            nn.init.uniform_(self.pseudo_reference_points.weight, 0, 1)
            self.pseudo_reference_points.weight.requires_grad_(False)
        nn.init.constant_(self.cls_branches[0][-1].bias, bias_init_with_prob(0.01))

    def new_stream_state(self, *, relative_time: bool = False) -> StreamState:
        """An empty stream state of this head's ``memory_len`` (``relative_time``: see
        :class:`StreamingMemory`)."""
        return StreamState(
            memory_len=self.params.memory_len, embed_dims=self.params.embed_dims, relative_time=relative_time
        )

    # ------------------------------------------------------------------ geometry

    def _position_embedding(
        self,
        location: torch.Tensor,
        pad_shape: Tuple[int, int],
        intrinsics: torch.Tensor,
        lidar2img: torch.Tensor,
        topk_indexes: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """3D position embedding (B, L, C) and the 8-d camera cone (B, L, 8) of every image token."""
        batch, num_cams = intrinsics.shape[:2]
        _, height, width, _ = location.shape
        tokens_per_cam = height * width
        pad_h, pad_w = pad_shape
        with full_precision(location.device):
            focal = torch.stack([intrinsics[..., 0, 0], intrinsics[..., 1, 1]], dim=-1).float().abs() / 1e3
            if self.params.per_camera_focal:
                focal = focal.repeat_interleave(tokens_per_cam, dim=1)  # (B, L, 2), token's own camera
            else:
                # Reference quirk: tiling the camera axis gives token t the focal lengths of camera t mod N.
                focal = focal.repeat(1, tokens_per_cam, 1)  # (B, L, 2)
            pad_wh = device_constant([pad_w, pad_h], location, torch.float32)
            pixels = location.float() * pad_wh  # (B N, h, w, 2) pixel centres
            depth = self.coords_d.float()
            num_bins = depth.size(0)
            pixels = pixels.view(batch, num_cams, tokens_per_cam, 1, 2)
            uv = pixels * torch.clamp(depth, min=1e-5).view(num_bins, 1)  # (B, N, hw, D, 2)
            coords = torch.cat(
                [uv, depth.view(num_bins, 1).expand_as(uv[..., :1]), torch.ones_like(uv[..., :1])], dim=-1
            )  # (B, N, hw, D, 4): (u d, v d, d, 1)
            img2lidar = inverse_4x4(lidar2img.float())  # (B, N, 4, 4)
            coords3d = torch.matmul(img2lidar[:, :, None, None], coords.unsqueeze(-1)).squeeze(-1)[..., :3]
            low, high = self.position_range[0:3], self.position_range[3:6]
            coords3d = (coords3d - low) / (high - low)
            coords3d = coords3d.reshape(batch, num_cams * tokens_per_cam, num_bins * 3)  # (B, L, 3 D)
            if topk_indexes is not None:
                coords3d = _gather_tokens(coords3d, topk_indexes)
                focal = _gather_tokens(focal, topk_indexes)
            bin_start = (num_bins - CONE_BIN_FROM_END) * 3
            cone = torch.cat([focal, coords3d[..., -3:], coords3d[..., bin_start : bin_start + 3]], dim=-1)
            position_input = inverse_sigmoid(coords3d)
        return self.position_encoder(position_input), cone

    def image_keys(
        self,
        *,
        img_feats: torch.Tensor,
        location: torch.Tensor,
        pad_shape: Tuple[int, int],
        intrinsics: torch.Tensor,
        lidar2img: torch.Tensor,
        topk_indexes: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Image memory (B, L, C) (the cross-attention values) and its 3D position embedding (B, L, C),
        for the arguments of :meth:`forward`."""
        batch, num_cams, channels, height, width = img_feats.shape
        tokens = img_feats.permute(0, 1, 3, 4, 2).reshape(batch, num_cams * height * width, channels)
        if topk_indexes is not None:
            tokens = _gather_tokens(tokens, topk_indexes)
        pos_embed, cone = self._position_embedding(location, pad_shape, intrinsics, lidar2img, topk_indexes)
        memory = self.memory_embed(tokens)
        memory = self.spatial_alignment(memory, cone)
        return memory, self.featurized_pe(pos_embed, memory)

    def fresh_query_positions(self, reference_points: torch.Tensor) -> torch.Tensor:
        """Position embedding (B, Q, C) of current-frame queries at normalised ``reference_points``
        (B, Q, 3): what :meth:`forward` adds to their content before attending (query embedding,
        ego-motion MLN with the identity pose, time embedding of age 0)."""
        query_pos = self.query_embedding(self._sine_embedding(reference_points))
        _, query_pos = self._current_query_alignment(torch.zeros_like(query_pos), query_pos)
        return query_pos

    def _current_query_alignment(
        self, tgt: torch.Tensor, query_pos: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Ego-motion MLN (zero velocity and age, identity pose: one code for all) and the time
        embedding of age 0, applied to the current frame's queries."""
        if self.params.with_ego_pos:
            identity_pose = torch.eye(4, device=query_pos.device)[:3, :].flatten()
            current_code = torch.cat([query_pos.new_zeros(3), identity_pose]).view(1, 1, EGO_MOTION_CODE_SIZE)
            current_code = nerf_positional_encoding(current_code)  # (1, 1, 180)
            tgt = self.ego_pose_memory(tgt, current_code)
            query_pos = self.ego_pose_pe(query_pos, current_code)
        zero_age = query_pos.new_zeros(1, 1, 1)
        return tgt, query_pos + self.time_embedding(pos2posemb1d(zero_age, self.params.embed_dims))

    def _sine_embedding(self, points: torch.Tensor) -> torch.Tensor:
        """Sine embedding (..., 3 C / 2) of normalised reference points (..., 3), for ``query_embedding``."""
        return pos2posemb3d(
            points, self.params.embed_dims // 2, temperature=self.params.query_pos_temperature
        )

    def _temporal_alignment(
        self,
        query_pos: torch.Tensor,
        tgt: torch.Tensor,
        reference_points: torch.Tensor,
        memory: StreamingMemory,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ego-motion MLN and time embedding of queries and ``memory`` (brought into this frame); append the
        propagated rows.

        Returns ``tgt`` and ``query_pos`` (B, Q', C), ``reference_points`` (B, Q', 3) with
        Q' = Q (+ pad) + P, and the remaining memory ``temp_memory``, ``temp_pos`` (B, M - P, C).
        """
        low, high = self.pc_range[0:3], self.pc_range[3:6]
        with full_precision(query_pos.device):
            temp_reference_point = (memory.reference_point - low) / (high - low)  # (B, M, 3)
            memory_age = memory.timestamp  # (B, M, 1) float64
            memory_time_feats = pos2posemb1d(memory_age, self.params.embed_dims).float()  # (B, M, C)
        temp_pos = self.query_embedding(self._sine_embedding(temp_reference_point))
        temp_memory = memory.embedding

        tgt, query_pos = self._current_query_alignment(tgt, query_pos)
        if self.params.with_ego_pos:
            memory_code = torch.cat(
                [memory.velo, memory_age.float(), memory.egopose[..., :3, :].flatten(-2)], dim=-1
            )  # (B, M, 15)
            memory_code = nerf_positional_encoding(memory_code)  # (B, M, 180)
            temp_pos = self.ego_pose_pe(temp_pos, memory_code)
            temp_memory = self.ego_pose_memory(temp_memory, memory_code)
        temp_pos = temp_pos + self.time_embedding(memory_time_feats)

        if self.params.num_propagated > 0:
            propagated = self.params.num_propagated
            tgt = torch.cat([tgt, temp_memory[:, :propagated]], dim=1)
            query_pos = torch.cat([query_pos, temp_pos[:, :propagated]], dim=1)
            reference_points = torch.cat(
                [reference_points, temp_reference_point[:, :propagated].to(reference_points.dtype)], dim=1
            )
            temp_memory = temp_memory[:, propagated:]
            temp_pos = temp_pos[:, propagated:]
        return tgt, query_pos, reference_points, temp_memory, temp_pos

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        *,
        img_feats: torch.Tensor,
        location: torch.Tensor,
        pad_shape: Tuple[int, int],
        intrinsics: torch.Tensor,
        lidar2img: torch.Tensor,
        timestamp: torch.Tensor,
        ego_pose: torch.Tensor,
        ego_pose_inv: torch.Tensor,
        prev_exists: torch.Tensor,
        stream: StreamState,
        gt_bboxes_3d: Optional[Sequence[torch.Tensor]] = None,
        gt_labels_3d: Optional[Sequence[torch.Tensor]] = None,
        topk_indexes: Optional[torch.Tensor] = None,
    ) -> StreamPETRHeadOutputs:
        """Run one frame and update ``stream``'s memory and query ids.

        Args:
            img_feats: (B, N, C_in, h, w) neck features.
            location: (B * N, h, w, 2) normalised token centres ``((16 j + 8) / pad_w, (16 i + 8) / pad_h)``.
            pad_shape: (pad_h, pad_w) of the padded input images.
            intrinsics: (B, N, 4, 4); only K[0, 0], K[1, 1] are read.
            lidar2img: (B, N, 4, 4) LiDAR -> padded-image pixels.
            timestamp: (B,) float64 seconds; with a ``relative_time`` memory float32 seconds since the
                stream's previous frame.
            ego_pose, ego_pose_inv: (B, 4, 4) LiDAR -> global and its inverse.
            prev_exists: (B,) 0 at the first frame of a stream.
            stream: the streams' state (B rows, or empty), read and written.
            gt_bboxes_3d, gt_labels_3d: per-sample GT (gravity-centre boxes (n, 9)); used for denoising
                queries in training only.
            topk_indexes: (B, K, 1) image-token order from the 2D head, or None (all tokens).

        Returns:
            :class:`StreamPETRHeadOutputs` (the denoising queries split off).
        """
        queue = stream.memory
        if timestamp.dtype != queue.time_dtype:
            meaning = "seconds since the previous frame" if queue.relative_time else "absolute seconds"
            raise TypeError(f"timestamp must be {queue.time_dtype} ({meaning}), got {timestamp.dtype}")
        batch = img_feats.shape[0]
        device = img_feats.device
        pc_low, pc_high = self.pc_range[0:3], self.pc_range[3:6]
        with full_precision(device):
            pseudo_points = None
            if self.params.num_propagated > 0:
                pseudo_points = self.pseudo_reference_points.weight * (pc_high - pc_low) + pc_low
            queue.pre_update(
                prev_exists=prev_exists.float(),
                timestamp=timestamp,
                ego_pose_inv=ego_pose_inv.float(),
                pseudo_reference_points=pseudo_points,
            )
        query_ids = stream.query_identities.query_ids(
            prev_exists=prev_exists,
            num_fresh=self.params.num_query,
            num_propagated=self.params.num_propagated,
        )

        memory, pos_embed = self.image_keys(
            img_feats=img_feats, location=location, pad_shape=pad_shape, intrinsics=intrinsics,
            lidar2img=lidar2img, topk_indexes=topk_indexes,
        )

        guidance = None
        if self.training and self.params.geometric_guidance_weight > 0:
            guidance = self._geometric_guidance(
                keys=memory + pos_embed, lidar2img=lidar2img, pad_shape=pad_shape,
                feature_hw=(int(img_feats.shape[-2]), int(img_feats.shape[-1])), topk_indexes=topk_indexes,
            )

        attn_mask, mask_dict = None, None
        if self.training and self.params.with_dn and gt_bboxes_3d is not None and gt_labels_3d is not None:
            dn = build_denoising_queries(
                gt_bboxes_3d=[boxes[:, :9] for boxes in gt_bboxes_3d],
                gt_labels_3d=gt_labels_3d,
                reference_points=self.reference_points.weight,
                num_query=self.params.num_query,
                pc_range=self.pc_range,
                num_classes=self.num_classes,
                num_groups=self.params.scalar,
                noise_scale=self.params.noise_scale,
                noise_trans=self.params.noise_trans,
                split=self.params.split,
                num_propagated=self.params.num_propagated,
                memory_len=queue.capacity,
            )
            reference_points, attn_mask, mask_dict = dn.reference_points, dn.attn_mask, dn.mask_dict
        else:
            reference_points = self.reference_points.weight.unsqueeze(0).repeat(batch, 1, 1)
        pad_size = mask_dict["pad_size"] if mask_dict is not None else 0

        query_pos = self.query_embedding(self._sine_embedding(reference_points))  # (B, P+Q, C)
        tgt = torch.zeros_like(query_pos)
        tgt, query_pos, reference_points, temp_memory, temp_pos = self._temporal_alignment(
            query_pos, tgt, reference_points, queue
        )
        outs_dec = self.transformer(memory, tgt, query_pos, pos_embed, attn_mask, temp_memory, temp_pos)
        outs_dec = torch.nan_to_num(outs_dec)  # (layers, B, pad + Q + P, C)

        reference_logits = inverse_sigmoid(reference_points)
        all_cls_scores, all_bbox_preds = [], []
        for layer_index in range(outs_dec.size(0)):
            all_cls_scores.append(self.cls_branches[layer_index](outs_dec[layer_index]))
            regression = self.reg_branches[layer_index](outs_dec[layer_index])
            centers = (regression[..., 0:3] + reference_logits).sigmoid()
            all_bbox_preds.append(torch.cat([centers, regression[..., 3:]], dim=-1))
        all_cls_scores = torch.stack(all_cls_scores).float()
        all_bbox_preds = torch.stack(all_bbox_preds).float()
        all_bbox_preds = torch.cat(
            [all_bbox_preds[..., 0:3] * (pc_high - pc_low) + pc_low, all_bbox_preds[..., 3:]], dim=-1
        )

        matching_cls = all_cls_scores[:, :, pad_size:]
        matching_boxes = all_bbox_preds[:, :, pad_size:]
        with full_precision(device):
            written = queue.post_update(
                embedding=outs_dec[-1, :, pad_size:].float(),
                reference_point=matching_boxes[-1, ..., 0:3],
                velo=matching_boxes[-1, ..., -2:],
                scores=matching_cls[-1].sigmoid().max(dim=-1).values,
                topk=self.params.topk_proposals,
                timestamp=timestamp,
                ego_pose=ego_pose.float(),
            )
        stream.query_identities.remember(query_ids=query_ids, written=written)

        if mask_dict is not None and pad_size > 0:
            mask_dict["output_known_lbs_bboxes"] = (
                all_cls_scores[:, :, :pad_size],
                all_bbox_preds[:, :, :pad_size],
            )
            all_cls_scores, all_bbox_preds = matching_cls, matching_boxes
        else:
            mask_dict = None
        return StreamPETRHeadOutputs(
            all_cls_scores=all_cls_scores,
            all_bbox_preds=all_bbox_preds,
            query_ids=query_ids,
            dn_mask_dict=mask_dict,
            geometric_guidance=guidance,
        )

    def _geometric_guidance(
        self,
        *,
        keys: torch.Tensor,
        lidar2img: torch.Tensor,
        pad_shape: Tuple[int, int],
        feature_hw: Tuple[int, int],
        topk_indexes: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The warm start's alignment loss and attention share on this frame's keys (B, L, C), at
        ``geometric_guidance_points`` random points per sample."""
        points = torch.rand(keys.shape[0], self.params.geometric_guidance_points, 3, device=keys.device)
        return alignment_loss(
            self, keys=keys, lidar2img=lidar2img, pad_shape=pad_shape, feature_hw=feature_hw,
            stride=pad_shape[1] // feature_hw[1], reference_points=points,
            token_order=None if topk_indexes is None else topk_indexes[..., 0],
        )

    # ------------------------------------------------------------------ losses and decoding

    def matching_problem(
        self,
        gt_bboxes_3d: Sequence[torch.Tensor],
        gt_labels_3d: Sequence[torch.Tensor],
        preds: StreamPETRHeadOutputs,
    ) -> MatchingProblem:
        """The Hungarian matching costs of every decoder layer (the arguments of :meth:`loss`), on the
        device; :meth:`loss` takes its solution."""
        return self.criterion.matching_problem(
            preds.all_cls_scores, preds.all_bbox_preds, list(gt_bboxes_3d), list(gt_labels_3d),
            self.match_costs,
        )

    def loss(
        self,
        gt_bboxes_3d: Sequence[torch.Tensor],
        gt_labels_3d: Sequence[torch.Tensor],
        preds: StreamPETRHeadOutputs,
        assignments: Optional[Sequence[AssignResult]] = None,
    ) -> Dict[str, torch.Tensor]:
        """3D losses of :meth:`forward`'s outputs against per-sample GT boxes (n, 9) (gravity-centre z) and
        labels (n,). Keys: ``loss_cls``, ``loss_bbox``, ``d0..d4.loss_*`` and the ``dn_`` counterparts; with
        geometric guidance also ``loss_geometric_guidance`` (weighted) and ``geometric_guidance_share`` (the
        attention share on the target tokens, detached). ``assignments``: the solved
        :meth:`matching_problem` (None: solved here)."""
        losses = self.criterion(
            preds.all_cls_scores,
            preds.all_bbox_preds,
            preds.dn_mask_dict,
            list(gt_bboxes_3d),
            list(gt_labels_3d),
            self.code_weights,
            self.match_costs,
            assignments=assignments,
        )
        if preds.geometric_guidance is not None:
            loss, share = preds.geometric_guidance
            losses["loss_geometric_guidance"] = self.params.geometric_guidance_weight * loss
            losses["geometric_guidance_share"] = share
        return losses

    @torch.no_grad()
    def decode_fixed(self, preds: StreamPETRHeadOutputs) -> Dict[str, torch.Tensor]:
        """Decode the last layer at a fixed size: the top K = ``max_num`` (query, class) pairs, no NMS.

        Returns ``{"boxes_3d": (B, K, 9) (x, y, z_bottom, dx, dy, dz, yaw, vx, vy), "scores_3d": (B, K)
        descending, "labels_3d": (B, K), "keep": (B, K) bool}`` in the current LiDAR frame; ``keep`` is
        False where the decoder's ``post_center_range`` or ``score_threshold`` drops the pair. With
        ``preds.query_ids`` also ``"query_ids_3d"`` (B, K): the id of each pair's query.
        """
        dense = self.bbox_coder.decode_dense(preds.all_cls_scores[-1], preds.all_bbox_preds[-1])
        boxes = dense.bboxes
        bottom_z = boxes[..., 2:3] - boxes[..., 5:6] * 0.5  # gravity centre -> bottom centre
        decoded = {
            "boxes_3d": torch.cat([boxes[..., :2], bottom_z, boxes[..., 3:]], dim=-1),
            "scores_3d": dense.scores,
            "labels_3d": dense.labels,
            "keep": dense.keep,
        }
        if preds.query_ids is not None:
            decoded["query_ids_3d"] = torch.gather(preds.query_ids, 1, dense.query_index)  # (B, K)
        return decoded

    @torch.no_grad()
    def get_bboxes(self, preds: StreamPETRHeadOutputs) -> List[Dict[str, torch.Tensor]]:
        """Decode the last layer (:meth:`decode_fixed` without the dropped pairs, and without the duplicates
        the decoder's ``nms_radius`` suppresses when it is set).

        Returns per sample ``{"boxes_3d": (K, 9) (x, y, z_bottom, dx, dy, dz, yaw, vx, vy),
        "scores_3d": (K,), "labels_3d": (K,)}`` in the current LiDAR frame, K <= ``max_num``, and
        ``"query_ids_3d"`` (K,) (the id of the query each box came from) with ``preds.query_ids``.
        """
        fixed = self.decode_fixed(preds)
        fixed["keep"] = self.bbox_coder.suppress_duplicates(fixed["boxes_3d"], fixed["labels_3d"], fixed["keep"])
        names = [name for name in ("boxes_3d", "scores_3d", "labels_3d", "query_ids_3d") if name in fixed]
        kept = [keep.nonzero().squeeze(1) for keep in fixed["keep"]]  # one read per row
        return [{name: fixed[name][row][kept[row]] for name in names} for row in range(len(kept))]


def _gather_tokens(values: torch.Tensor, topk_indexes: torch.Tensor) -> torch.Tensor:
    """Rows ``topk_indexes`` (B, K, 1) of ``values`` (B, L, F) -> (B, K, F)."""
    return torch.gather(values, 1, topk_indexes.expand(-1, -1, values.size(-1)))


class StreamPETRHeadParams(BaseModel):
    """User settings of :class:`StreamPETRHead`; defaults are the V2-99 recipe
    (stream_petr_vov_flash_800_bs2_seq_24e.py). ``in_channels`` comes from the neck, ``num_classes`` from
    the dataset."""

    model_config = ConfigDict(extra="forbid")

    embed_dims: int = Field(default=256, gt=0, description="Channels of queries, memory and decoder.")
    num_query: int = Field(default=644, gt=0, description="Learnable queries (reference points).")
    memory_len: int = Field(default=1024, gt=0, description="Memory rows kept between frames.")
    topk_proposals: int = Field(default=256, gt=0, description="Queries written to the memory per frame.")
    num_propagated: int = Field(
        default=256, ge=0, description="Most recent memory rows appended to the queries (the rest are keys)."
    )
    num_reg_fcs: int = Field(
        default=2, ge=0, description="Hidden layers of the classification / regression branches."
    )
    with_dn: bool = Field(default=True, description="Query denoising in training.")
    with_ego_pos: bool = Field(default=True, description="Ego-motion MLN on queries and memory.")
    match_with_velo: bool = Field(default=False, description="Include velocity in the Hungarian L1 cost.")
    scalar: int = Field(default=10, gt=0, description="Denoising groups (noised copies of every GT).")
    noise_scale: float = Field(default=1.0, ge=0, description="Denoising centre jitter, in half box sizes.")
    noise_trans: float = Field(default=0.0, ge=0, description="Added to the half box size of the jitter.")
    dn_weight: float = Field(default=1.0, ge=0, description="Weight of the denoising losses.")
    split: float = Field(
        default=0.75, gt=0, description="Denoising copies with jitter norm above this get background targets."
    )
    LID: bool = Field(default=True, description="Linear-increasing depth bins (else uniform).")
    depth_num: int = Field(
        default=64, ge=CONE_BIN_FROM_END, description="Depth bins of the 3D position embedding."
    )
    depth_start: float = Field(default=1.0, gt=0, description="Depth of the first bin, metres.")
    position_range: List[float] = Field(
        default=list(POSITION_RANGE),
        min_length=6,
        max_length=6,
        description="Frustum normalisation range [x_min, y_min, z_min, x_max, y_max, z_max]; "
        "x_max is also the depth of the last bin.",
    )
    pc_range: List[float] = Field(
        default=list(PC_RANGE),
        min_length=6,
        max_length=6,
        description="Range of reference points and box centres [x_min, y_min, z_min, x_max, y_max, z_max].",
    )
    code_weights: List[float] = Field(
        default=list(CODE_WEIGHTS), min_length=10, max_length=10, description="Per-dimension L1 loss weights."
    )
    match_costs: Optional[List[float]] = Field(
        default=None, description="Per-dimension weights of the matching L1 cost (default: code_weights)."
    )
    num_layers: int = Field(default=6, gt=0, description="Decoder layers.")
    num_heads: int = Field(default=8, gt=0, description="Attention heads.")
    feedforward_channels: int = Field(default=2048, gt=0, description="FFN hidden channels.")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="Dropout of attention and FFN.")
    with_cp: bool = Field(
        default=True, description="Activation checkpointing of each decoder layer in training."
    )
    attention_backend: str = Field(default="sdpa", description="Registered attention backend name.")
    post_center_range: List[float] = Field(
        default=list(POSITION_RANGE),
        min_length=6,
        max_length=6,
        description="Decoded boxes whose centre lies outside this range are dropped.",
    )
    max_num: int = Field(default=300, gt=0, description="Boxes kept per frame by the decoder.")
    score_threshold: Optional[float] = Field(default=None, description="Minimum score of decoded boxes.")
    nms_radius: Optional[float] = Field(
        default=None, gt=0,
        description="Class-wise suppression of decoded boxes whose centres lie within this distance (m) of "
        "a higher-scoring box of their class; None: none (the reference; its six decoder layers' "
        "self-attention removes duplicates, a one-layer decoder cannot).",
    )
    per_camera_focal: bool = Field(
        default=False,
        description="Give every image token its own camera's focal length in the cone (the reference tiles "
        "the camera axis instead; off reproduces the reference).",
    )
    query_pos_temperature: float = Field(
        default=10000.0,
        gt=0,
        description="Temperature of the sine embedding of reference points (reference: 10000). Lower values "
        "make the queries' position embeddings differ more from the start, which shortens the phase in which "
        "all queries attend alike when training from scratch (the CPU demo uses 20).",
    )
    geometric_guidance_weight: float = Field(
        default=0.0,
        ge=0,
        description="Weight of an auxiliary, label-free loss in training: the geometric warm start's "
        "alignment of the cross-attention of fresh queries with the tokens their points project into "
        "(models/losses/geometric_alignment.py), on each frame's keys. 0: off, as the reference. Keeps "
        "the attention geometric when training from scratch (the CPU demo; docs/demo.md).",
    )
    geometric_guidance_points: int = Field(
        default=64, gt=0, description="Random points per sample for the geometric guidance loss."
    )
    criterion: StreamPETRCriterionParams = Field(
        default_factory=StreamPETRCriterionParams,
        description="Loss and matching weights of the 3D loss (the reference's by default).",
    )
