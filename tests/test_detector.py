"""The StreamPETR detector: reference key compatibility, streaming logic, and a tiny model that learns."""
import json
from pathlib import Path

import pytest
import torch

from streampetr_plugin.models.backbones.resnet import ResNet, ResNetParams
from streampetr_plugin.models.backbones.vovnet import VoVNet, VoVNetParams
from streampetr_plugin.models.detector import StreamPETRDetector, StreamPETRDetectorParams, token_locations
from streampetr_plugin.models.heads.focal_head import FocalHead, FocalHeadParams
from streampetr_plugin.models.heads.streampetr_head import StreamPETRHead, StreamPETRHeadParams
from streampetr_plugin.models.layers.grid_mask import GridMaskParams
from streampetr_plugin.models.necks.cp_fpn import CPFPN, CPFPNParams
from tests import reference_synth as synth

FIXTURES = Path(__file__).parent / "fixtures"
NUM_CLASSES, NUM_CAMS, IMG_H, IMG_W = 3, 2, 64, 128


def full_size_detector(backbone_name: str) -> StreamPETRDetector:
    """The reference recipes' architecture (R50 704x256 or V2-99 800x320)."""
    if backbone_name == "r50":
        backbone = ResNet(ResNetParams(depth=50, out_indices=[2, 3]))
    else:
        backbone = VoVNet(VoVNetParams(spec_name="V-99-eSE", out_features=["stage4", "stage5"]))
    channels = [spec.channels for spec in backbone.output_shape().values()]
    return StreamPETRDetector(
        StreamPETRDetectorParams(),
        img_backbone=backbone,
        img_neck=CPFPN(CPFPNParams(out_channels=256, num_outs=2), in_channels=channels),
        img_roi_head=FocalHead(FocalHeadParams(), in_channels=256, num_classes=10, stride=16),
        pts_bbox_head=StreamPETRHead(StreamPETRHeadParams(), in_channels=256, num_classes=10),
        stride=16,
    )


@pytest.mark.parametrize("backbone_name, spec", [("r50", "r50_704"), ("vov", "vov_800")])
def test_state_dict_keys_shapes_and_parameter_count_equal_the_reference(backbone_name, spec):
    reference = json.loads((FIXTURES / f"reference_state_dict_{spec}.json").read_text())
    with torch.device("meta"):  # shapes only, no memory
        model = full_size_detector(backbone_name)
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    theirs = {key: entry["shape"] for key, entry in reference["state_dict"].items()}
    assert sorted(set(ours) - set(theirs)) == [] and sorted(set(theirs) - set(ours)) == []
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == reference["num_parameters"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == reference["num_trainable"]


def test_reference_r50_state_dict_loads_with_nothing_missing_or_unexpected():
    shapes = synth.load_key_list(FIXTURES / "reference_state_dict_r50_704.json")
    state = synth.make_state_dict(shapes, {})
    model = full_size_detector("r50")
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    head = model.pts_bbox_head
    # The six branch slots are one module, so all six copies hold the loaded values.
    assert torch.equal(head.cls_branches[5][0].weight, state["pts_bbox_head.cls_branches.0.0.weight"])
    assert model.stream_state.memory.is_empty  # the memory is not part of the state dict


# ---------------------------------------------------------------------------------------------- tiny model


def tiny_detector(seed: int = 0, **detector_settings) -> StreamPETRDetector:
    torch.manual_seed(seed)
    backbone = VoVNet(VoVNetParams(spec_name="V-tiny", with_cp=False))
    channels = [spec.channels for spec in backbone.output_shape().values()]
    head_params = StreamPETRHeadParams(
        embed_dims=32,
        num_query=16,
        memory_len=16,
        topk_proposals=4,
        num_propagated=4,
        scalar=2,
        depth_num=30,
        num_layers=2,
        num_heads=4,
        feedforward_channels=64,
        dropout=0.0,
        with_cp=False,
        max_num=10,
    )
    return StreamPETRDetector(
        StreamPETRDetectorParams(**{"use_grid_mask": False, **detector_settings}),
        img_backbone=backbone,
        img_neck=CPFPN(CPFPNParams(out_channels=32, num_outs=2), in_channels=channels),
        img_roi_head=FocalHead(
            FocalHeadParams(embed_dims=32), in_channels=32, num_classes=NUM_CLASSES, stride=16
        ),
        pts_bbox_head=StreamPETRHead(head_params, in_channels=32, num_classes=NUM_CLASSES),
        stride=16,
    )


def tiny_batch(step: int = 0, batch_size: int = 2, scene_tokens=None):
    """Two streams, two cameras (front/back) of 64 x 128 px, two objects per frame, fixed content."""
    gen = torch.Generator().manual_seed(42)
    intrinsics = torch.eye(4).repeat(NUM_CAMS, 1, 1)
    intrinsics[:, 0, 0] = intrinsics[:, 1, 1] = 60.0
    intrinsics[:, 0, 2], intrinsics[:, 1, 2] = IMG_W / 2, IMG_H / 2
    front = torch.tensor([[1.0, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    back = torch.tensor([[-1.0, 0, 0, 0], [0, 0, -1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
    extrinsics = torch.stack([front, back])
    poses = torch.eye(4).repeat(batch_size, 1, 1)
    poses[:, 0, 3] = 500.0 + 2.0 * step
    gt_boxes = [
        torch.tensor(
            [[2.0, 12.0, 0.0, 4.0, 2.0, 1.5, 0.1, 1.0, 0.0], [-3.0, -9.0, 0.5, 1.0, 1.0, 1.8, 1.2, 0.0, 0.5]]
        ),
        torch.tensor(
            [[5.0, 20.0, -0.5, 4.5, 2.0, 1.6, -0.3, 2.0, 0.0], [0.0, -15.0, 0.0, 0.6, 0.6, 1.7, 0, 0, 0]]
        ),
    ][:batch_size]
    box_2d = torch.tensor([[40.0, 20.0, 90.0, 50.0]])
    return {
        "img": torch.randn(batch_size, NUM_CAMS, 3, IMG_H, IMG_W, generator=gen),
        "intrinsics": intrinsics.expand(batch_size, -1, -1, -1),
        "extrinsics": extrinsics.expand(batch_size, -1, -1, -1),
        "lidar2img": (intrinsics @ extrinsics).expand(batch_size, -1, -1, -1),
        "timestamp": torch.full((batch_size,), 1.6e9 + 0.5 * step, dtype=torch.float64),
        "ego_pose": poses,
        "ego_pose_inv": torch.linalg.inv(poses),
        "prev_exists": torch.full((batch_size,), float(step > 0)),
        "scene_token": scene_tokens or [f"scene-{b}" for b in range(batch_size)],
        "sample_token": [f"sample-{b}-{step}" for b in range(batch_size)],
        "gt_bboxes_3d": gt_boxes,
        "gt_labels_3d": [torch.tensor([0, 2]), torch.tensor([1, 2])][:batch_size],
        "gt_bboxes_2d": [[box_2d, box_2d + 5] for _ in range(batch_size)],
        "gt_labels_2d": [[torch.tensor([0]), torch.tensor([2])] for _ in range(batch_size)],
        "centers_2d": [[torch.tensor([[65.0, 35.0]]), torch.tensor([[70.0, 40.0]])]] * batch_size,
        "depths": [[torch.tensor([12.0]), torch.tensor([9.0])] for _ in range(batch_size)],
    }


def test_training_step_returns_the_reference_loss_names():
    model = tiny_detector().train()
    losses = model(tiny_batch()).losses
    expected = {"loss_cls", "loss_bbox", "dn_loss_cls", "dn_loss_bbox"}
    expected |= {f"d0.{prefix}loss_{kind}" for prefix in ("", "dn_") for kind in ("cls", "bbox")}
    expected |= {"enc_loss_cls", "enc_loss_bbox", "enc_loss_iou", "centers2d_losses", "centerness_losses"}
    assert set(losses) == expected
    assert all(value.dim() == 0 and torch.isfinite(value) for value in losses.values())


def test_tiny_detector_overfits_two_frames():
    model = tiny_detector(seed=3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batch = tiny_batch()
    history = []
    torch.manual_seed(0)
    for step in range(50):
        batch["prev_exists"] = torch.full((2,), float(step > 0))
        losses = model(batch).losses
        total = sum(value for name, value in losses.items() if "loss" in name)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.5 * first, history


def test_inference_outputs_and_scene_token_resets():
    model = tiny_detector().eval()
    seen = []
    model.pts_bbox_head.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["prev_exists"].tolist()), with_kwargs=True
    )
    detections = model(tiny_batch(0, scene_tokens=["a", "b"])).detections
    assert len(detections) == 2
    for det in detections:
        assert det["boxes_3d"].shape == (10, 9)
        assert det["scores_3d"].shape == det["labels_3d"].shape == (10,)
        assert ((det["labels_3d"] >= 0) & (det["labels_3d"] < NUM_CLASSES)).all()
    model(tiny_batch(1, scene_tokens=["a", "c"]))  # row 1 enters a new scene
    model(tiny_batch(2, scene_tokens=["a", "c"]))
    assert seen == [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]  # the batch's prev_exists is ignored at inference
    model.stream_state.reset()
    model(tiny_batch(3, scene_tokens=["a", "c"]))
    assert seen[-1] == [0.0, 0.0]


def test_inference_streams_are_independent_of_the_batch_prev_exists():
    model = tiny_detector().eval()
    first = model(tiny_batch(0)).detections
    model.stream_state.reset()
    batch = tiny_batch(0)
    batch["prev_exists"] = torch.ones(2)
    second = model(batch).detections
    for a, b in zip(first, second):
        assert torch.equal(a["scores_3d"], b["scores_3d"])


def test_training_after_inference_starts_from_a_fresh_memory():
    model = tiny_detector().eval()
    model(tiny_batch(0, batch_size=1))
    model.train()
    seen = []
    model.pts_bbox_head.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["stream"].memory.is_empty), with_kwargs=True
    )
    model(tiny_batch(1))  # two streams now; memory of the one inference stream is dropped
    assert seen == [True]


def test_backbone_under_autocast_keeps_head_in_float32():
    model = tiny_detector().train()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        losses = model(tiny_batch()).losses
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in losses.values())
    memory = model.stream_state.memory
    assert memory.timestamp.dtype == torch.float64 and memory.reference_point.dtype == torch.float32


def test_grid_mask_applies_in_training_only():
    model = tiny_detector(use_grid_mask=True)
    model.grid_mask.prob = 1.0
    images = []
    model.img_backbone.register_forward_pre_hook(lambda module, args: images.append(args[0].clone()))
    batch = tiny_batch()
    model.eval()
    model.extract_img_feats(batch["img"])
    model.train()
    model.extract_img_feats(batch["img"])
    original = batch["img"].flatten(0, 1)
    assert torch.equal(images[0], original)
    assert (images[1] == 0).any() and not torch.equal(images[1], original)


def test_token_locations_are_cell_centres_over_the_padded_size():
    location = token_locations(2, 3, stride=16, pad_hw=(32, 64), device=torch.device("cpu"))
    assert location.shape == (2, 3, 2)
    torch.testing.assert_close(location[1, 2], torch.tensor([(2 * 16 + 8) / 64, (16 + 8) / 32]))


def test_detector_params_defaults():
    params = StreamPETRDetectorParams()
    defaults = (params.use_grid_mask, params.grid_mask, params.position_level, params.aux_2d_only)
    assert defaults == (True, GridMaskParams(), 0, True)
