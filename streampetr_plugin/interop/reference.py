"""Run one frame with the reference's names and layouts, to compare numbers against the reference.

:func:`run_reference_frame` is what the fidelity tests use against the golden outputs of the reference
StreamPETR (``tests/fixtures/r50_128x352_3frames.pt``), and what a user porting a reference checkpoint
runs to check that our detector gives the reference's numbers. See ``docs/interop.md``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from streampetr_plugin.models.detector import StreamPETRDetector

# Intermediates that can be captured, named as in the fixture's ``probes``.
PROBE_NAMES = (
    "backbone.0",
    "backbone.1",
    "neck.0",
    "neck.1",
    "img_feats",
    "position_encoder",
    "memory_embed",
    "spatial_alignment",
    "featurized_pe",
    "transformer.0",
)


def _frame_batch(inputs: Mapping[str, Any], device: torch.device) -> Dict[str, Any]:
    img = torch.as_tensor(inputs["img"], dtype=torch.float32)
    if img.dim() == 4:
        img = img.unsqueeze(0)  # (1, N, 3, H, W)

    def per_camera(name: str) -> torch.Tensor:
        return torch.as_tensor(inputs[name], dtype=torch.float32).reshape(1, -1, 4, 4).to(device)

    def pose(name: str) -> torch.Tensor:
        return torch.as_tensor(inputs[name], dtype=torch.float32).reshape(1, 4, 4).to(device)

    return {
        "img": img.to(device),
        "intrinsics": per_camera("intrinsics"),
        "extrinsics": per_camera("extrinsics"),
        "lidar2img": per_camera("lidar2img"),
        "timestamp": torch.as_tensor(inputs["timestamp"], dtype=torch.float64).reshape(1).to(device),
        "ego_pose": pose("ego_pose"),
        "ego_pose_inv": pose("ego_pose_inv"),
        "scene_token": [str(inputs.get("scene_token", ""))],
    }


def _probe_hooks(model: StreamPETRDetector, probes: Dict[str, torch.Tensor], num_cams: int) -> List[Any]:
    head = model.pts_bbox_head

    def keep(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            probes[name] = output.detach().clone()

        return hook

    def backbone_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        for index, value in enumerate(output.values() if isinstance(output, dict) else output):
            probes[f"backbone.{index}"] = value.detach().float().clone()

    def neck_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        for index, value in enumerate(output):
            probes[f"neck.{index}"] = value.detach().float().clone()
        level = output[model.params.position_level].detach().float()
        probes["img_feats"] = level.reshape(-1, num_cams, *level.shape[1:]).clone()

    def transformer_hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        probes["transformer.0"] = output.detach().clone()

    handles = [
        model.img_backbone.register_forward_hook(backbone_hook),
        model.img_neck.register_forward_hook(neck_hook),
        head.transformer.register_forward_hook(transformer_hook),
    ]
    for name in ("position_encoder", "memory_embed", "spatial_alignment", "featurized_pe"):
        handles.append(getattr(head, name).register_forward_hook(keep(name)))
    return handles


@torch.no_grad()
def run_reference_frame(
    model: StreamPETRDetector,
    inputs: Mapping[str, Any],
    memory: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    capture_probes: bool = False,
) -> Dict[str, Any]:
    """One eval-mode frame of one stream, in the reference's names and layouts.

    Args:
        model: the detector (put in eval mode for the call, restored afterwards).
        inputs: ``img`` (N, 3, H, W) normalised, padded network input; ``intrinsics``, ``extrinsics``,
            ``lidar2img`` (N, 4, 4); ``timestamp`` float64 seconds; ``ego_pose``, ``ego_pose_inv`` (4, 4);
            ``prev_exists`` (0: the stream starts here, the memory is reset; 1: it continues).
        memory: if given, loaded into the memory of the detector's stream state first, in the fixture's
            layout: ``embedding`` (R, C), ``reference_point`` (R, 3) global metres, ``timestamp`` (R, 1)
            float64 (minus the writing frame's time), ``egopose`` (R, 4, 4), ``velo`` (R, 2). Otherwise the
            model's current memory is used.
        capture_probes: also return the intermediates of :data:`PROBE_NAMES` under ``probes``.

    Returns:
        ``all_cls_scores`` (layers, Q, num_classes) logits and ``all_bbox_preds`` (layers, Q, 10) of every
        decoder layer (Q = learnable + propagated queries); ``det_boxes_3d`` (K, 9) with bottom-centre z,
        ``det_scores_3d`` (K,), ``det_labels_3d`` (K,), ``det_query_index`` (K,); ``memory_after``: the
        memory after the frame in the layout of ``memory`` (R = memory_len + topk rows); and ``probes``
        when asked.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    head = model.pts_bbox_head
    stream_memory = model.stream_state.memory
    if memory is not None:
        stream_memory.load({name: torch.as_tensor(value).to(device) for name, value in memory.items()})
    batch = _frame_batch(inputs, device)
    prev_exists = torch.as_tensor(inputs["prev_exists"], dtype=torch.float32).reshape(1).to(device)

    probes: Dict[str, torch.Tensor] = {}
    handles = _probe_hooks(model, probes, batch["img"].shape[1]) if capture_probes else []
    try:
        outputs = model.infer(batch, prev_exists=prev_exists)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    decoded = head.bbox_coder.decode(outputs.all_cls_scores[-1], outputs.all_bbox_preds[-1])[0]
    detections = outputs.detections[0]
    result: Dict[str, Any] = {
        "all_cls_scores": outputs.all_cls_scores[:, 0],
        "all_bbox_preds": outputs.all_bbox_preds[:, 0],
        "det_boxes_3d": detections["boxes_3d"],
        "det_scores_3d": detections["scores_3d"],
        "det_labels_3d": detections["labels_3d"],
        "det_query_index": decoded["query_index"],
        "memory_after": {name: value[0] for name, value in stream_memory.save().items()},
    }
    if capture_probes:
        result["probes"] = probes
    return result
