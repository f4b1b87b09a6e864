"""Assemble a detector from a validated recipe, every part through the registries."""
from __future__ import annotations

from torch import nn

from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.plugins import get_plugin_host


def build_model(recipe: Recipe) -> nn.Module:
    """The detector described by ``recipe.model`` (on CPU, plugins loaded, nothing moved to a device).

    Sizes flow from declared shapes: the neck from the backbone's ``output_shape()``, the heads
    from the neck level the detector uses.
    """
    host = get_plugin_host()
    registries = host.registries
    spec = recipe.model
    num_classes = len(recipe.data.class_names)
    backbone = registries.backbones.build(spec.backbone.type, spec.backbone.options())
    backbone_shape = backbone.output_shape()
    neck = registries.necks.build(spec.neck.type, spec.neck.options(), input_shape=backbone_shape)
    detector_options = registries.detectors.validate_options(spec.type, spec.options())
    level_shape = neck.output_shape(backbone_shape)[detector_options.get("position_level", 0)]
    roi_head = None
    if spec.roi_head is not None:
        roi_head = registries.heads.build(
            spec.roi_head.type, spec.roi_head.options(), input_shape=level_shape, num_classes=num_classes
        )
    head = registries.heads.build(spec.head.type, spec.head.options(), input_shape=level_shape, num_classes=num_classes)
    model = registries.detectors.get(spec.type).factory(
        **detector_options, img_backbone=backbone, img_neck=neck, img_roi_head=roi_head, pts_bbox_head=head
    )
    host.pm.hook.streampetr_post_model_build(model=model, recipe=recipe)
    return model
