"""The ``streampetr`` blocks of a MindSpeed-MM YAML, validated (typos are errors).

The host keeps unknown YAML keys as plain dicts, so StreamPETR's settings live in two blocks of
their own: ``model.streampetr`` (read by the model's ``from_pretrained``) and
``data.dataset_param.streampetr`` (read by the dataset). Both name the same recipe; a YAML anchor
(``recipe: &recipe ...`` / ``recipe: *recipe``) keeps them in step.
"""

from __future__ import annotations

from typing import Any, List, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field

BLOCK = "streampetr"


class HostModelParams(BaseModel):
    """``model.streampetr``: which detector to build and which weights to start from."""

    model_config = ConfigDict(extra="forbid")

    recipe: str = Field(description="Recipe file or shipped recipe name the detector is built from.")
    recipe_overrides: List[str] = Field(
        default_factory=list, description="``a.b=value`` / ``~a.b`` overrides applied to the recipe."
    )
    load_from: Optional[str] = Field(
        None,
        description="Pretrained or reference weights (.pth: mmcv layout, backbone-only, or a host checkpoint "
        "exported by `export_host_checkpoint`); null: the recipe's runtime.load_from.",
    )
    autocast: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto",
        description="Autocast inside the model on NPU/CUDA (backbone and neck; the heads stay fp32). "
        "'auto': bf16 when the recipe enables mixed precision (the host has no loss scaler, so fp16 "
        "is opt-in); never on CPU.",
    )


class HostDatasetParams(BaseModel):
    """``data.dataset_param.streampetr``: the training data and its per-rank streaming layout."""

    model_config = ConfigDict(extra="forbid")

    recipe: str = Field(description="Recipe file or shipped recipe name whose data.train section is used.")
    recipe_overrides: List[str] = Field(
        default_factory=list, description="``a.b=value`` / ``~a.b`` overrides applied to the recipe."
    )
    micro_batch_size: int = Field(
        1,
        ge=1,
        description="Streams per device; must equal training.micro_batch_size (checked on every batch).",
    )
    world_size: Optional[int] = Field(
        None,
        ge=1,
        description="Data-parallel ranks the layout is made for; null: WORLD_SIZE from the environment.",
    )
    epochs: int = Field(
        1,
        ge=1,
        description="Epochs of StreamPETR's sampler laid out back to back in one host epoch (the host "
        "repeats its epoch unshuffled, so lay out at least as many as train_iters covers).",
    )


class HostTrainingParams(BaseModel):
    """``training.streampetr``: what the custom entry (``...mindspeed_mm.train``) adds to the host's loop."""

    model_config = ConfigDict(extra="forbid")

    lr_schedule: Literal["recipe", "host"] = Field(
        "recipe",
        description="'recipe': the recipe's exact per-iteration schedule (mmcv cosine with warmup); "
        "'host': the host's lr_decay_style/lr_warmup_ratio/lr_start/lr_min (warmup differs slightly).",
    )
    log_loss_terms: bool = Field(True, description="Add every loss term (rank mean) to the host's log line.")
    evaluate_at_end: bool = Field(
        True, description="After training, evaluate the recipe's val set with StreamPETR's nuScenes metric."
    )
    eval_dir: str = Field(
        "work_dirs/mindspeed_mm_eval", description="Where the evaluation writes its results."
    )


def read_block(section: Any, model: type, *, required: bool = True) -> Any:
    """Validate the ``streampetr`` block of a host section (a pydantic object or a dict).

    A missing block is an error when ``required``, else all defaults.
    """
    block = section.get(BLOCK) if isinstance(section, Mapping) else getattr(section, BLOCK, None)
    if block is None and required:
        raise ValueError(f"the MindSpeed-MM YAML lacks the {model.__doc__.split(':')[0]} block")
    return model.model_validate(block or {})
