"""Hook specifications of the ``streampetr`` plugin system.

A plugin is any object or module with functions marked ``@hookimpl`` (``from streampetr_plugin
import hookimpl``), published through the ``streampetr`` entry-point group. Registration hooks
receive a ``register(name, factory, *, params=None)`` callback (:class:`Register`): ``params`` is an
optional pydantic model that validates a component's options once, when the recipe is loaded, and
``factory(params, **context)`` builds the component from that instance (without a params model:
``factory(**options, **context)``, options unchecked). ``options`` in the hook descriptions below stands
for either. The built-in StreamPETR components are registered by the built-in plugin through these
same hooks.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol, Type

import pluggy
from pydantic import BaseModel

PROJECT_NAME = "streampetr"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class Register(Protocol):
    """The callback a registration hook receives: ``register(name, factory, params=Model)``.

    ``params`` (a pydantic model) validates the component's options in a recipe; ``factory(params,
    **context)`` then builds the component from the instance (without ``params``: ``factory(**options,
    **context)``).
    """

    def __call__(
        self, name: str, factory: Callable[..., Any], *, params: Optional[Type[BaseModel]] = None
    ) -> None:
        ...


@hookspec
def streampetr_register_backbones(register: Register) -> None:
    """Register image backbones. ``factory(**options)`` returns an ``nn.Module`` following the
    backbone contract: ``forward(images) -> dict[str, Tensor]`` and ``output_shape() ->
    dict[str, ShapeSpec]``."""


@hookspec
def streampetr_register_necks(register: Register) -> None:
    """Register necks. ``factory(**options, input_shape=dict[str, ShapeSpec])`` returns an
    ``nn.Module`` mapping the backbone's feature dict to a list of levels and exposing
    ``output_shape(input_shape) -> list[ShapeSpec]``."""


@hookspec
def streampetr_register_heads(register: Register) -> None:
    """Register detection heads (the 3D head and the 2D auxiliary head).
    ``factory(**options, input_shape=ShapeSpec, num_classes=int)`` returns an ``nn.Module``."""


@hookspec
def streampetr_register_detectors(register: Register) -> None:
    """Register detectors. ``factory(**options, input_shape=ShapeSpec, img_backbone=..., img_neck=...,
    img_roi_head=..., pts_bbox_head=...)`` assembles the modules built from the recipe's ``model`` section
    (``input_shape``: the neck level the heads read, its channels and stride)."""


@hookspec
def streampetr_register_datasets(register: Register) -> None:
    """Register datasets. ``factory(**options, training=bool, classes=list[str])`` returns a
    map-style dataset whose items collate into the batch contract of ``streampetr_plugin.data.batch``
    (``classes``: the recipe's ``data.class_names``, the label order shared with the model)."""


@hookspec
def streampetr_register_losses(register: Register) -> None:
    """Register loss modules. ``factory(**options)`` returns an ``nn.Module``."""


@hookspec
def streampetr_register_optimizers(register: Register) -> None:
    """Register optimisers. ``factory(**options, param_groups=list[dict])`` returns a
    ``torch.optim.Optimizer``; per-group ``lr`` is already scaled by the lr multipliers."""


@hookspec
def streampetr_register_lr_schedulers(register: Register) -> None:
    """Register learning-rate schedules. ``factory(**options, max_iters=int)`` returns a callable
    ``iteration -> factor`` applied to every group's base learning rate."""


@hookspec
def streampetr_register_adapters(register: Register) -> None:
    """Register accelerator adapters. ``factory(**options)`` returns an object with ``name``,
    ``conflicts``, ``precheck(context)`` and ``apply(context)`` (see ``streampetr_plugin.adapters``)."""


@hookspec
def streampetr_register_trackers(register: Register) -> None:
    """Register multi-object trackers. ``factory(**options)`` returns an object with ``reset()`` (a new scene
    starts) and ``update(frame) -> (N,) int64`` track ids of the frame's detections, -1 for those not
    output (see ``streampetr_plugin.tracking.frame``: ``TrackingFrame``, ``Tracker``)."""


@hookspec
def streampetr_register_attention_backends(register: Register) -> None:
    """Register attention kernels. ``factory()`` returns a callable ``attend(q, k, v, *, attn_mask,
    dropout_p, training) -> out`` on head-split tensors (see ``streampetr_plugin.models.layers.attention``);
    a recipe's ``model.head.attention_backend`` and the accelerator adapters select one by name."""


@hookspec
def streampetr_configure(recipe: Any) -> None:
    """Inspect the validated recipe before anything is built (may log or raise)."""


@hookspec
def streampetr_post_model_build(model: Any, recipe: Any) -> None:
    """Called with the freshly built detector (on CPU, before adapters and device placement)."""


@hookspec
def streampetr_pre_train(context: Any) -> None:
    """Called once before the first training step with the trainer's context."""


@hookspec
def streampetr_post_train(context: Any) -> None:
    """Called once after training finished (also after an early stop)."""


@hookspec(firstresult=True)
def streampetr_select_accelerator(env: Mapping[str, Any]) -> Optional[str]:
    """Return ``"npu"``, ``"cuda"`` or ``"cpu"`` to override automatic device selection, or None.
    ``env`` holds ``requested`` (the recipe's ``accelerator.device``) and ``environ``."""
