"""StreamPETR head, memory queue and query denoising on a tiny configuration."""
import io
import math

import numpy as np
import pytest
import torch

from streampetr_plugin.models.heads.streampetr_head import StreamPETRHead, StreamPETRHeadParams
from streampetr_plugin.models.layers.denoising import build_denoising_queries, denoising_attention_mask
from streampetr_plugin.models.layers.memory import StreamingMemory
from streampetr_plugin.models.layers.positional_encoding import nerf_positional_encoding, pos2posemb3d
from streampetr_plugin.models.layers.transformer import PETRTransformerDecoder

NUM_CAMS, FEAT_H, FEAT_W, STRIDE = 2, 2, 4, 16
PAD_HW = (FEAT_H * STRIDE, FEAT_W * STRIDE)
TINY = dict(
    in_channels=16,
    num_classes=3,
    embed_dims=32,
    num_query=12,
    memory_len=16,
    topk_proposals=6,
    num_propagated=4,
    scalar=3,
    depth_num=30,
    num_layers=2,
    num_heads=4,
    feedforward_channels=64,
    dropout=0.0,
    with_cp=False,
    max_num=20,
)


def tiny_head(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = {**TINY, **overrides}
    in_channels, num_classes = settings.pop("in_channels"), settings.pop("num_classes")
    return StreamPETRHead(StreamPETRHeadParams(**settings), in_channels=in_channels, num_classes=num_classes)


def _pose(x, y, yaw):
    pose = torch.eye(4, dtype=torch.float64)
    pose[:2, :2] = torch.tensor([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
    pose[0, 3], pose[1, 3] = x, y
    return pose


def _cameras():
    """Two cameras (front, back) at 30 px focal length, LiDAR -> pixels of the padded 32 x 64 input."""
    intrinsics = torch.eye(4).repeat(NUM_CAMS, 1, 1)
    intrinsics[:, 0, 0] = intrinsics[:, 1, 1] = 30.0
    intrinsics[:, 0, 2], intrinsics[:, 1, 2] = PAD_HW[1] / 2, PAD_HW[0] / 2
    lidar_to_cam_front = torch.tensor([[1.0, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    lidar_to_cam_back = torch.tensor([[-1.0, 0, 0, 0], [0, 0, -1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
    extrinsics = torch.stack([lidar_to_cam_front, lidar_to_cam_back])
    return intrinsics, intrinsics @ extrinsics


def frame(t, batch=2, prev_exists=None, seed=None):
    """Inputs of frame ``t`` for ``batch`` streams (ego moving 2 m and 0.05 rad per frame)."""
    gen = torch.Generator().manual_seed(100 + t if seed is None else seed)
    intrinsics, lidar2img = _cameras()
    poses = torch.stack([_pose(600.0 + 2 * t + 10 * b, 1600.0 + b, 0.05 * t + 0.3 * b) for b in range(batch)])
    location = torch.stack(
        torch.meshgrid(
            (torch.arange(FEAT_H, dtype=torch.float32) * STRIDE + STRIDE // 2) / PAD_HW[0],
            (torch.arange(FEAT_W, dtype=torch.float32) * STRIDE + STRIDE // 2) / PAD_HW[1],
            indexing="ij",
        )[::-1],
        dim=-1,
    )
    return dict(
        img_feats=torch.randn(batch, NUM_CAMS, TINY["in_channels"], FEAT_H, FEAT_W, generator=gen),
        location=location.expand(batch * NUM_CAMS, -1, -1, -1),
        pad_shape=PAD_HW,
        intrinsics=intrinsics.expand(batch, -1, -1, -1),
        lidar2img=lidar2img.expand(batch, -1, -1, -1),
        timestamp=torch.full((batch,), 1.5e9 + 0.5 * t, dtype=torch.float64),
        ego_pose=poses.float(),
        ego_pose_inv=torch.linalg.inv(poses).float(),
        prev_exists=torch.full((batch,), float(t > 0)) if prev_exists is None else prev_exists,
    )


def gt_for(batch_counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    boxes, labels = [], []
    for count in batch_counts:
        centre = (torch.rand(count, 3, generator=gen) - 0.5) * torch.tensor([40.0, 40.0, 2.0])
        size = torch.rand(count, 3, generator=gen) * 3 + 0.5
        rest = torch.rand(count, 3, generator=gen)
        boxes.append(torch.cat([centre, size, rest], dim=1))
        labels.append(torch.randint(0, TINY["num_classes"], (count,), generator=gen))
    return boxes, labels


# ---------------------------------------------------------------------------------------------- shapes


def test_params_defaults_are_the_v2_99_recipe():
    params = StreamPETRHeadParams()
    queue = (params.num_query, params.memory_len, params.topk_proposals, params.num_propagated)
    assert queue == (644, 1024, 256, 256)
    denoising_and_depth = (params.scalar, params.noise_scale, params.split, params.LID, params.depth_num)
    assert denoising_and_depth == (10, 1.0, 0.75, True, 64)
    head = StreamPETRHead(params, in_channels=256, num_classes=10)
    assert sum(p.numel() for p in head.parameters()) == 11_188_736  # the spec's budget, shared branches once
    assert torch.allclose(head.coords_d[[0, 34, 63]], torch.tensor([1.0, 18.2207, 59.3477]), atol=1e-4)
    assert head.cls_branches[0] is head.cls_branches[5] and head.reg_branches[0] is head.reg_branches[5]
    assert not head.pseudo_reference_points.weight.requires_grad


def test_eval_forward_shapes_and_decoding():
    head = tiny_head().eval()
    stream = head.new_stream_state()
    with torch.no_grad():
        out = head(**frame(0), stream=stream)
    queries = TINY["num_query"] + TINY["num_propagated"]
    assert out.all_cls_scores.shape == (TINY["num_layers"], 2, queries, TINY["num_classes"])
    assert out.all_bbox_preds.shape == (TINY["num_layers"], 2, queries, 10)
    assert out.dn_mask_dict is None
    pc = head.pc_range
    centres = out.all_bbox_preds[..., :3]
    assert ((centres >= pc[:3]) & (centres <= pc[3:])).all()
    memory = stream.memory
    assert memory.embedding.shape == (2, TINY["memory_len"] + TINY["topk_proposals"], TINY["embed_dims"])
    assert memory.timestamp.dtype == torch.float64
    detections = head.get_bboxes(out)
    decoded = head.bbox_coder.decode(out.all_cls_scores[-1], out.all_bbox_preds[-1])
    assert len(detections) == 2
    for det, raw in zip(detections, decoded):
        assert det["boxes_3d"].shape == (TINY["max_num"], 9)
        # Bottom-centre z at the output.
        torch.testing.assert_close(det["boxes_3d"][:, 2], raw["bboxes"][:, 2] - raw["bboxes"][:, 5] / 2)
        assert torch.all(det["scores_3d"][:-1] >= det["scores_3d"][1:])


def test_propagated_queries_and_their_detections_carry_the_ids_of_the_queries_they_remember():
    head = tiny_head().eval()
    queries, propagated = TINY["num_query"], TINY["num_propagated"]
    stream = head.new_stream_state()
    with torch.no_grad():
        first = head(**frame(0), stream=stream)
        second = head(**frame(1), stream=stream)
    # the memory's rows are the previous frame's best queries by max class probability, best first
    ranking = first.all_cls_scores[-1].sigmoid().max(dim=-1).values
    remembered = torch.topk(ranking, TINY["topk_proposals"], dim=1).indices[:, :propagated]
    assert torch.equal(second.query_ids[:, queries:], torch.gather(first.query_ids, 1, remembered))
    fresh = set(second.query_ids[:, :queries].flatten().tolist())
    assert not fresh & set(first.query_ids.flatten().tolist())
    for row, detections in enumerate(head.get_bboxes(second)):
        for box, query_id in zip(detections["boxes_3d"], detections["query_ids_3d"]):
            query = (second.query_ids[row] == query_id).nonzero().item()
            torch.testing.assert_close(box[:2], second.all_bbox_preds[-1, row, query, :2])


def test_training_forward_splits_denoising_queries_and_losses_backpropagate():
    head = tiny_head(dropout=0.1).train()
    boxes, labels = gt_for([2, 3])
    stream = head.new_stream_state()
    out = head(**frame(0), stream=stream, gt_bboxes_3d=boxes, gt_labels_3d=labels)
    pad = TINY["scalar"] * 3
    queries = TINY["num_query"] + TINY["num_propagated"]
    assert out.all_cls_scores.shape == (TINY["num_layers"], 2, queries, TINY["num_classes"])
    known_cls, known_boxes = out.dn_mask_dict["output_known_lbs_bboxes"]
    assert known_cls.shape == (TINY["num_layers"], 2, pad, TINY["num_classes"])
    assert known_boxes.shape == (TINY["num_layers"], 2, pad, 10)
    losses = head.loss(boxes, labels, out)
    expected = {"loss_cls", "loss_bbox", "d0.loss_cls", "dn_loss_cls", "dn_loss_bbox", "d0.dn_loss_bbox"}
    assert expected <= set(losses)
    sum(losses.values()).backward()
    assert head.reference_points.weight.grad.abs().sum() > 0
    assert head.transformer.decoder.layers[0].attentions[1].attn.in_proj_weight.grad.abs().sum() > 0
    # The memory is written detached: nothing in it carries a graph into the next iteration.
    remembered = (stream.memory.embedding, stream.memory.reference_point, stream.memory.velo)
    assert not any(value.requires_grad for value in remembered)


# ---------------------------------------------------------------------------------------------- denoising


def _mask_by_rule(single_pad, groups, queries, propagated, memory):
    pad = single_pad * groups
    rows, cols = pad + queries + propagated, pad + queries + memory
    mask = np.zeros((rows, cols), dtype=bool)
    for i in range(rows):
        for j in range(pad):  # only dn columns are ever blocked
            if i >= pad:
                mask[i, j] = True  # matching / propagated queries never see a dn query
            elif i // single_pad != j // single_pad:
                mask[i, j] = True  # a dn group sees only itself
    return mask


def test_denoising_mask_blocks_exactly_the_rule():
    mask = denoising_attention_mask(
        single_pad=3, num_groups=4, num_query=5, num_propagated=2, memory_len=6, device=torch.device("cpu")
    )
    assert mask.dtype == torch.bool and mask.shape == (12 + 5 + 2, 12 + 5 + 6)
    np.testing.assert_array_equal(mask.numpy(), _mask_by_rule(3, 4, 5, 2, 6))


def test_denoising_mask_isolates_groups_in_the_decoder():
    torch.manual_seed(0)
    single_pad, groups, queries, propagated, memory_rows = 2, 3, 4, 2, 5
    pad = single_pad * groups
    decoder = PETRTransformerDecoder(
        num_layers=2, embed_dims=16, num_heads=2, feedforward_channels=32, dropout=0.0
    ).eval()
    mask = denoising_attention_mask(
        single_pad=single_pad,
        num_groups=groups,
        num_query=queries,
        num_propagated=propagated,
        memory_len=propagated + memory_rows,
        device=torch.device("cpu"),
    )
    num = pad + queries + propagated
    query, query_pos = torch.randn(1, num, 16), torch.randn(1, num, 16)
    key, key_pos = torch.randn(1, 7, 16), torch.randn(1, 7, 16)
    temp_memory, temp_pos = torch.randn(1, memory_rows, 16), torch.randn(1, memory_rows, 16)
    base = decoder(query, key, query_pos, key_pos, temp_memory, temp_pos, mask)
    perturbed_query = query.clone()
    perturbed_query[:, single_pad : 2 * single_pad] += 5.0  # group 1 only
    perturbed = decoder(perturbed_query, key, query_pos, key_pos, temp_memory, temp_pos, mask)
    changed = (perturbed - base).abs().amax(dim=(0, 1, 3)) > 1e-5  # per query row
    expected = torch.zeros(num, dtype=torch.bool)
    expected[single_pad : 2 * single_pad] = True
    assert torch.equal(changed, expected)


def test_denoising_queries_layout_and_relabelling():
    boxes, labels = gt_for([2, 3])
    reference_points = torch.rand(5, 3)
    pc_range = torch.tensor([-51.2, -51.2, -5.0, 51.2, 51.2, 3.0])
    groups, split, num_classes = 4, 0.75, 3
    dn = build_denoising_queries(
        gt_bboxes_3d=boxes,
        gt_labels_3d=labels,
        reference_points=reference_points,
        num_query=5,
        pc_range=pc_range,
        num_classes=num_classes,
        num_groups=groups,
        noise_scale=1.0,
        noise_trans=0.0,
        split=split,
        num_propagated=2,
        memory_len=6,
        generator=torch.Generator().manual_seed(7),
    )
    jitter = torch.rand(groups * 5, 3, generator=torch.Generator().manual_seed(7)) * 2 - 1  # same draws
    md = dn.mask_dict
    assert md["pad_size"] == groups * 3
    assert dn.reference_points.shape == (2, groups * 3 + 5, 3)
    assert dn.attn_mask.shape == (groups * 3 + 5 + 2, groups * 3 + 5 + 6)
    all_boxes, all_labels = torch.cat(boxes), torch.cat(labels)
    known_labels, known_boxes = md["known_lbs_bboxes"]
    assert torch.equal(md["known_indice"], torch.arange(5).repeat(groups))  # group-major copies
    assert torch.equal(md["batch_idx"], torch.tensor([0, 0, 1, 1, 1]))
    slot_in_group = torch.tensor([0, 1, 0, 1, 2]).repeat(groups)
    assert torch.equal(md["map_known_indice"], slot_in_group + 3 * torch.arange(groups).repeat_interleave(5))
    torch.testing.assert_close(known_boxes, all_boxes.repeat(groups, 1))
    expected_labels = torch.where(jitter.norm(dim=1) > split, num_classes, all_labels.repeat(groups))
    assert torch.equal(known_labels, expected_labels)
    noised = all_boxes.repeat(groups, 1)[:, :3] + jitter * all_boxes.repeat(groups, 1)[:, 3:6] / 2
    expected_points = ((noised - pc_range[:3]) / (pc_range[3:] - pc_range[:3])).clamp(0, 1)
    bid = torch.tensor([0, 0, 1, 1, 1]).repeat(groups)
    torch.testing.assert_close(dn.reference_points[bid, md["map_known_indice"]], expected_points)
    # Unused slot of sample 0 in every group stays at the origin; learnable points follow the dn block.
    for group in range(groups):
        assert torch.equal(dn.reference_points[0, group * 3 + 2], torch.zeros(3))
    torch.testing.assert_close(dn.reference_points[:, groups * 3 :], reference_points.expand(2, -1, -1))


# ---------------------------------------------------------------------------------------------- memory


def test_memory_pre_update_aligns_points_by_ego_motion_as_computed_by_hand():
    memory = StreamingMemory(capacity=3, embed_dims=2)
    pose_then = _pose(600.0, 1650.0, 0.4)  # writer frame: LiDAR -> global
    local_points = torch.tensor(
        [[10.0, -2.0, 0.5], [-5.0, 7.0, 1.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0]], dtype=torch.float64
    )
    global_points = (pose_then[:3, :3] @ local_points.T).T + pose_then[:3, 3]
    memory.load(
        {
            "embedding": torch.randn(4, 2),
            "reference_point": global_points.float(),
            "timestamp": torch.full((4, 1), -100.0, dtype=torch.float64),
            "egopose": pose_then.float().expand(4, 4, 4),
            "velo": torch.tensor([[1.0, 2.0]] * 4),
        }
    )
    pose_now = _pose(603.0, 1651.0, 0.45)
    memory.pre_update(
        prev_exists=torch.ones(1),
        timestamp=torch.tensor([100.5], dtype=torch.float64),
        ego_pose_inv=torch.linalg.inv(pose_now).float()[None],
    )
    rotation, translation = pose_now[:3, :3].numpy(), pose_now[:3, 3].numpy()
    expected = (rotation.T @ (global_points.numpy() - translation).T).T  # R^T (p - t)
    assert memory.reference_point.shape == (1, 3, 3)  # truncated to the capacity
    np.testing.assert_allclose(memory.reference_point[0].numpy(), expected[:3], atol=2e-3)
    relative = np.linalg.inv(pose_now.numpy()) @ pose_then.numpy()
    np.testing.assert_allclose(memory.egopose[0, 0].numpy(), relative, atol=1e-3)
    assert memory.timestamp.dtype == torch.float64
    np.testing.assert_allclose(memory.timestamp[0, :, 0].numpy(), [0.5, 0.5, 0.5])  # ages in seconds
    np.testing.assert_array_equal(memory.velo[0].numpy(), [[1.0, 2.0]] * 3)  # velocities are not rotated


def test_memory_post_update_prepends_topk_and_moves_to_global():
    memory = StreamingMemory(capacity=4, embed_dims=2)
    pseudo = torch.tensor([[1.0, 2.0, 0.5], [3.0, -4.0, 1.0]])
    memory.pre_update(
        prev_exists=torch.zeros(1),
        timestamp=torch.tensor([50.0], dtype=torch.float64),
        ego_pose_inv=torch.eye(4)[None],
    )
    assert memory.reference_point.abs().sum() == 0
    memory.reset()
    memory.pre_update(
        prev_exists=torch.zeros(1),
        timestamp=torch.tensor([50.0], dtype=torch.float64),
        ego_pose_inv=torch.eye(4)[None],
        pseudo_reference_points=pseudo,
    )
    torch.testing.assert_close(memory.reference_point[0, :2], pseudo)
    assert memory.reference_point[0, 2:].abs().sum() == 0
    assert torch.equal(memory.egopose[0, :2], torch.eye(4).expand(2, 4, 4))
    assert memory.egopose[0, 2:].abs().sum() == 0

    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    points = torch.tensor([[[1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0], [4.0, 0, 0]]])
    pose = _pose(100.0, 200.0, math.pi / 2).float()
    memory.post_update(
        embedding=torch.arange(8.0).view(1, 4, 2),
        reference_point=points,
        velo=torch.arange(8.0).view(1, 4, 2),
        scores=scores,
        topk=2,
        timestamp=torch.tensor([50.0], dtype=torch.float64),
        ego_pose=pose[None],
    )
    assert memory.embedding.shape == (1, 6, 2)
    # Queries 1 and 3 have the best scores, in that order.
    torch.testing.assert_close(memory.embedding[0, :2], torch.tensor([[2.0, 3.0], [6.0, 7.0]]))
    # Rotating (2, 0, 0) by 90 degrees gives (0, 2, 0); then translate.
    expected_points = torch.tensor([[100.0, 202.0, 0.0], [100.0, 204.0, 0.0]])
    torch.testing.assert_close(memory.reference_point[0, :2], expected_points)
    torch.testing.assert_close(memory.reference_point[0, 2:4], (pose[:3, :3] @ pseudo.T).T + pose[:3, 3])
    assert torch.equal(memory.timestamp[0, :, 0], torch.full((6,), -50.0, dtype=torch.float64))
    torch.testing.assert_close(memory.egopose[0, 0], pose)


def _decoder_outputs(head, stream, inputs):
    with torch.no_grad():
        out = head(**inputs, stream=stream)
    return out.all_cls_scores, out.all_bbox_preds


def test_memory_reset_at_scene_start_and_carried_otherwise():
    head = tiny_head().eval()
    stream = head.new_stream_state()
    _decoder_outputs(head, stream, frame(0))
    restart_row0 = frame(1, prev_exists=torch.tensor([0.0, 1.0]))
    cls_streaming, box_streaming = _decoder_outputs(head, stream, restart_row0)

    fresh = tiny_head().eval()  # same weights, no history
    cls_fresh, box_fresh = _decoder_outputs(
        fresh, fresh.new_stream_state(), frame(1, prev_exists=torch.tensor([0.0, 0.0]))
    )
    # Row 0 restarted: exactly as if the stream began here. Row 1 continued: it depends on its history.
    torch.testing.assert_close(cls_streaming[:, 0], cls_fresh[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(box_streaming[:, 0], box_fresh[:, 0], atol=1e-4, rtol=0)
    assert (cls_streaming[:, 1] - cls_fresh[:, 1]).abs().max() > 1e-3


def test_memory_batch_size_mismatch_is_an_error():
    memory = StreamingMemory(capacity=2, embed_dims=2)
    def streams(count):
        return dict(
            timestamp=torch.zeros(count, dtype=torch.float64), ego_pose_inv=torch.eye(4).expand(count, 4, 4)
        )

    memory.pre_update(prev_exists=torch.zeros(2), **streams(2))
    with pytest.raises(ValueError):
        memory.pre_update(prev_exists=torch.ones(3), **streams(3))


# ---------------------------------------------------------------------------------------------- training


def test_gradient_checkpointing_gives_the_same_gradients():
    boxes, labels = gt_for([2, 1])
    grads = []
    for with_cp in (False, True):
        head = tiny_head(with_cp=with_cp, dropout=0.1).train()
        torch.manual_seed(123)  # same denoising noise and dropout masks in both runs
        out = head(**frame(0), stream=head.new_stream_state(), gt_bboxes_3d=boxes, gt_labels_3d=labels)
        sum(head.loss(boxes, labels, out).values()).backward()
        grads.append({name: p.grad.clone() for name, p in head.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_checkpoint_saved_and_reloaded_gives_identical_outputs():
    head = tiny_head(seed=1).eval()
    stream = head.new_stream_state()
    _decoder_outputs(head, stream, frame(0))
    buffer = io.BytesIO()
    torch.save({"model": head.state_dict(), "streams": stream.save()}, buffer)
    buffer.seek(0)
    restored = tiny_head(seed=2).eval()  # different initial weights
    saved = torch.load(buffer, weights_only=True)
    restored.load_state_dict(saved["model"], strict=True)
    restored_stream = restored.new_stream_state()
    restored_stream.load(saved["streams"])
    expected = _decoder_outputs(head, stream, frame(1))
    got = _decoder_outputs(restored, restored_stream, frame(1))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ---------------------------------------------------------------------------------------------- encodings


def test_pos2posemb3d_orders_axes_y_x_z_with_interleaved_sin_cos():
    point = torch.tensor([[0.1, 0.2, 0.3]])
    emb = pos2posemb3d(point, num_pos_feats=4)
    dim_t = 10000 ** (2 * (torch.arange(4) // 2) / 4)

    def axis(v):
        a = v * 2 * math.pi / dim_t
        return torch.stack([a[0].sin(), a[1].cos(), a[2].sin(), a[3].cos()])

    torch.testing.assert_close(emb[0], torch.cat([axis(0.2), axis(0.1), axis(0.3)]))


def test_nerf_encoding_blocks_sin_then_cos_per_octave():
    values = torch.tensor([[0.5, -1.0]])
    enc = nerf_positional_encoding(values, num_encoding_functions=2)
    expected = torch.cat([values.sin(), values.cos(), (2 * values).sin(), (2 * values).cos()], dim=-1)
    torch.testing.assert_close(enc, expected)
