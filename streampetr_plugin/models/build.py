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

    Sizes flow from declared shapes: the neck from the backbone's ``output_shape()``, the heads
    from the neck level the detector uses.
    """
    spec = recipe.model
    num_classes = len(recipe.data.class_names)
    backbone = registries.backbones.build(spec.backbone.type, spec.backbone.options())
    backbone_shape = backbone.output_shape()
    neck = registries.necks.build(spec.neck.type, spec.neck.options(), input_shape=backbone_shape)
    detector_options = registries.detectors.validate_options(spec.type, spec.options())
    position_level = detector_options.get("position_level", 0)
    level_shape = neck.output_shape(backbone_shape)[position_level]
    # The heads place their tokens and 2D targets by the configured stride; a mismatch with the level
    # they read would otherwise surface as a shape error deep inside a loss.
    strides = {}
    if "stride" in detector_options:
        strides["model.stride"] = detector_options["stride"]
    roi_head_options = spec.roi_head.options() if spec.roi_head is not None else {}
    if "stride" in roi_head_options:
        strides["model.roi_head.stride"] = roi_head_options["stride"]
    wrong = {key: value for key, value in strides.items() if value != level_shape.stride}
    if wrong:
        raise ValueError(
            f"neck level {position_level} (model.position_level) has stride {level_shape.stride}, but "
            + ", ".join(f"{key} is {value}" for key, value in wrong.items())
            + f"; set them to {level_shape.stride}"
        )
    roi_head = None
    if spec.roi_head is not None:
        roi_head = registries.heads.build(
            spec.roi_head.type, roi_head_options, input_shape=level_shape, num_classes=num_classes
        )
    head = registries.heads.build(spec.head.type, spec.head.options(), input_shape=level_shape, num_classes=num_classes)
    model = registries.detectors.get(spec.type).factory(
        **detector_options, img_backbone=backbone, img_neck=neck, img_roi_head=roi_head, pts_bbox_head=head
    )
    bind_attention_backends(model, registries.attention_backends)
    return model
