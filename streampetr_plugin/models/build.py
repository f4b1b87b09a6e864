"""Assemble a detector from a validated recipe, every part through the registries."""
from __future__ import annotations

from torch import nn

from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.models.layers.multihead_attention import MultiheadAttentionCore
from streampetr_plugin.plugins import Registries
from streampetr_plugin.registry import Registry


def bind_attention_backends(model: nn.Module, backends: Registry) -> None:
    """Give every attention module of ``model`` the kernel its backend name selects in ``backends``."""
    for module in model.modules():
        if isinstance(module, MultiheadAttentionCore):
            module.use_backend(module.backend, backends.build(module.backend, {}))


def build_model(recipe: Recipe, registries: Registries) -> nn.Module:
    """The detector described by ``recipe.model``, every part from ``registries`` (on CPU, nothing moved to
    a device; the ``streampetr_post_model_build`` hook is the caller's to run).

    Sizes flow from declared shapes: the neck from the backbone's ``output_shape()``, the heads and the
    detector from the neck level the detector reads (its channels and stride).
    """
    spec = recipe.model
    num_classes = len(recipe.data.class_names)
    backbone = registries.backbones.build(spec.backbone.type, spec.backbone.arguments)
    backbone_shape = backbone.output_shape()
    neck = registries.necks.build(spec.neck.type, spec.neck.arguments, input_shape=backbone_shape)
    level_shape = neck.output_shape(backbone_shape)[spec.options().get("position_level", 0)]
    roi_head = None
    if spec.roi_head is not None:
        roi_head = registries.heads.build(
            spec.roi_head.type, spec.roi_head.arguments, input_shape=level_shape, num_classes=num_classes
        )
    head = registries.heads.build(
        spec.head.type, spec.head.arguments, input_shape=level_shape, num_classes=num_classes
    )
    model = registries.detectors.build(
        spec.type, spec.arguments, input_shape=level_shape, img_backbone=backbone, img_neck=neck,
        img_roi_head=roi_head, pts_bbox_head=head,
    )
    bind_attention_backends(model, registries.attention_backends)
    return model
