"""The geometric alignment loss: projection targets, the embeddings it reads, key order, guidance."""
from __future__ import annotations

import torch

from streampetr_plugin.models.losses.geometric_alignment import (
    NEIGHBOUR_WEIGHT,
    alignment_loss,
    projection_targets,
)

STRIDE, FEAT_H, FEAT_W = 16, 4, 8
PAD_HW = (FEAT_H * STRIDE, FEAT_W * STRIDE)  # (64, 128)
FOCAL = 60.0


def two_cameras(batch=1):
    """Two pinhole cameras at the LiDAR origin: front looks along +y, back along -y (z up)."""
    intrinsics = torch.eye(4).repeat(2, 1, 1)
    intrinsics[:, 0, 0] = intrinsics[:, 1, 1] = FOCAL
    intrinsics[:, 0, 2], intrinsics[:, 1, 2] = PAD_HW[1] / 2, PAD_HW[0] / 2
    front = torch.tensor([[1.0, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    back = torch.tensor([[-1.0, 0, 0, 0], [0, 0, -1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
    lidar2img = intrinsics @ torch.stack([front, back])
    return intrinsics.expand(batch, -1, -1, -1), lidar2img.expand(batch, -1, -1, -1)


def test_projection_targets_weight_the_token_a_point_projects_into_and_its_neighbours():
    _, lidar2img = two_cameras()
    # (0, 10, 0): front camera pixel (64 + 0, 32 + 0) -> token row 2, column 4; behind the back camera.
    # (10, 10, 0): front pixel (64 + 60, 32) -> row 2, column 7 (the last): 5 neighbours inside.
    # (0, 0, 10): straight up, seen by neither camera.
    points = torch.tensor([[[0.0, 10.0, 0.0], [10.0, 10.0, 0.0], [0.0, 0.0, 10.0]]])
    target, visible = projection_targets(points, lidar2img, pad_hw=PAD_HW, feature_hw=(FEAT_H, FEAT_W),
                                         stride=STRIDE)
    assert target.shape == (1, 3, 2 * FEAT_H * FEAT_W)
    assert visible.tolist() == [[True, True, False]]
    grid = target.view(1, 3, 2, FEAT_H, FEAT_W)

    expected_centre = torch.zeros(2, FEAT_H, FEAT_W)
    expected_centre[0, 1:4, 3:6] = NEIGHBOUR_WEIGHT
    expected_centre[0, 2, 4] = 1.0
    torch.testing.assert_close(grid[0, 0], expected_centre / expected_centre.sum())

    expected_edge = torch.zeros(2, FEAT_H, FEAT_W)
    expected_edge[0, 1:4, 6:8] = NEIGHBOUR_WEIGHT
    expected_edge[0, 2, 7] = 1.0
    torch.testing.assert_close(grid[0, 1], expected_edge / expected_edge.sum())
    assert torch.count_nonzero(grid[0, 2]) == 0


def test_fresh_query_positions_and_image_keys_are_what_the_decoder_uses():
    """The alignment loss reads ``fresh_query_positions`` and ``image_keys``: exactly the query positions of
    the learnable queries and the keys the decoder attends with, at the recipe's sine temperature."""
    from tests.test_streampetr_head import frame, tiny_head

    head = tiny_head(query_pos_temperature=20.0).eval()
    inputs = frame(0)
    seen = {}
    head.transformer.register_forward_pre_hook(lambda module, args: seen.update(args=args))
    with torch.no_grad():
        head(**inputs, stream=head.new_stream_state())
        memory, pos_embed = head.image_keys(**{key: inputs[key] for key in (
            "img_feats", "location", "pad_shape", "intrinsics", "lidar2img")})
        query_pos = head.fresh_query_positions(head.reference_points.weight.expand(2, -1, -1))
        other_temperature = tiny_head(query_pos_temperature=10000.0).fresh_query_positions(
            head.reference_points.weight.expand(2, -1, -1))
    decoder_memory, _, decoder_query_pos, decoder_pos_embed = seen["args"][:4]
    torch.testing.assert_close(memory, decoder_memory)
    torch.testing.assert_close(pos_embed, decoder_pos_embed)
    torch.testing.assert_close(query_pos, decoder_query_pos[:, : head.params.num_query])
    assert not torch.allclose(query_pos, other_temperature)


def _frame_keys(head, inputs):
    memory, pos_embed = head.image_keys(**{key: inputs[key] for key in (
        "img_feats", "location", "pad_shape", "intrinsics", "lidar2img")})
    return memory + pos_embed  # (B, L, C)


def test_alignment_loss_reads_keys_in_the_2d_heads_token_order():
    """Keys gathered in another token order (the 2D head's ranking) give the same loss and share when that
    order is passed along: the targets follow the tokens."""
    from tests.test_streampetr_head import FEAT_H, FEAT_W, PAD_HW as HEAD_PAD_HW, frame, tiny_head

    head = tiny_head().eval()
    inputs = frame(0)
    points = torch.rand(2, 24, 3, generator=torch.Generator().manual_seed(1))
    common = dict(lidar2img=inputs["lidar2img"], pad_shape=HEAD_PAD_HW, feature_hw=(FEAT_H, FEAT_W),
                  stride=HEAD_PAD_HW[1] // FEAT_W, reference_points=points)
    with torch.no_grad():
        keys = _frame_keys(head, inputs)
        order = torch.stack([torch.randperm(keys.shape[1], generator=torch.Generator().manual_seed(b))
                             for b in range(2)])  # (B, L)
        shuffled = keys.gather(1, order[..., None].expand(-1, -1, keys.shape[-1]))
        loss, share = alignment_loss(head, keys=keys, **common)
        loss_shuffled, share_shuffled = alignment_loss(head, keys=shuffled, token_order=order, **common)
        loss_unordered, _ = alignment_loss(head, keys=shuffled, **common)
    torch.testing.assert_close(loss_shuffled, loss)
    torch.testing.assert_close(share_shuffled, share)
    assert not torch.allclose(loss_unordered, loss)


def test_geometric_guidance_adds_the_weighted_alignment_loss_of_the_frame_in_training_only():
    from tests.test_streampetr_head import FEAT_H, FEAT_W, PAD_HW as HEAD_PAD_HW, frame, gt_for, tiny_head

    head = tiny_head(geometric_guidance_weight=0.5, geometric_guidance_points=16, dropout=0.0).train()
    inputs = frame(0)
    boxes, labels = gt_for([3, 2])
    torch.manual_seed(7)
    losses = head.loss(boxes, labels, head(**inputs, stream=head.new_stream_state()))
    torch.manual_seed(7)
    points = torch.rand(2, 16, 3)  # the guidance draws its points first in the forward pass
    with torch.no_grad():
        expected, expected_share = alignment_loss(
            head, keys=_frame_keys(head, inputs), lidar2img=inputs["lidar2img"], pad_shape=HEAD_PAD_HW,
            feature_hw=(FEAT_H, FEAT_W), stride=HEAD_PAD_HW[1] // FEAT_W, reference_points=points)
    torch.testing.assert_close(losses["loss_geometric_guidance"].detach(), 0.5 * expected)
    torch.testing.assert_close(losses["geometric_guidance_share"], expected_share)
    assert not losses["geometric_guidance_share"].requires_grad

    losses["loss_geometric_guidance"].backward()
    assert head.query_embedding[0].weight.grad.abs().sum() > 0
    assert head.position_encoder[0].weight.grad.abs().sum() > 0
    assert head.cls_branches[0][0].weight.grad is None  # the guidance does not train the predictions

    assert head.eval()(**frame(0), stream=head.new_stream_state()).geometric_guidance is None
    plain = tiny_head().train()
    plain_losses = plain.loss(boxes, labels, plain(**frame(0), stream=plain.new_stream_state()))
    assert not any("geometric_guidance" in name for name in plain_losses)
