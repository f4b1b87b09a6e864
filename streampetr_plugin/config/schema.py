"""The recipe schema: pydantic models for every section of a recipe file.

Structure is validated here (unknown keys are errors); the options of each registered component
(``type: <name>`` sections) are validated afterwards by the ``params`` model its plugin registered
(``streampetr_plugin.config.loader``), because plugins may add components with their own options. The
validated instance is kept (:attr:`ComponentOptions.params`): that is what the component's factory
receives, and what the recipe prints and saves, flat beside ``type``.
"""
from __future__ import annotations

import logging
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

logger = logging.getLogger(__name__)

# The nuScenes detection classes in label order: the default of data.class_names, the dataset and the metrics.
NUSCENES_CLASSES = (
    "car",
    "truck",
    "construction_vehicle",
    "bus",
    "trailer",
    "barrier",
    "motorcycle",
    "bicycle",
    "pedestrian",
    "traffic_cone",
)


def _switch_word(value: object) -> object:
    """YAML 1.1 reads unquoted ``on`` / ``off`` as booleans: take them back as the words they were."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


# 'auto', 'on' or 'off', written quoted or not.
AutoOnOff = Annotated[Literal["auto", "on", "off"], BeforeValidator(_switch_word)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ComponentOptions(BaseModel):
    """A section whose other keys are a registered component's options.

    As read, the options are the section's extra keys; once the loader has validated them they are the
    component's params instance (:meth:`use_params`), which replaces them.
    """

    model_config = ConfigDict(extra="allow")

    _params: Optional[BaseModel] = PrivateAttr(default=None)

    @property
    def params(self) -> BaseModel:
        """The validated options (an instance of the component's registered params model)."""
        if self._params is None:
            raise ValueError(f"{type(self).__name__}: options not validated (load the recipe with load_recipe)")
        return self._params

    def use_params(self, params: BaseModel) -> None:
        """Keep ``params`` as the component's options (from now on the only copy)."""
        self.__pydantic_extra__.clear()
        self._params = params

    @property
    def arguments(self) -> Union[BaseModel, Dict[str, Any]]:
        """What the component is built from: its params instance, or the unchecked options of a component
        registered without a params model."""
        return self._params if self._params is not None else dict(self.model_extra or {})

    def options(self) -> Dict[str, Any]:
        """The options as plain values (printing, settings derived for other tools)."""
        if self._params is not None:
            return self._params.model_dump()
        return dict(self.model_extra or {})

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Dict[str, Any]:
        data = handler(self)
        if self._params is not None:
            data.update(self._params.model_dump(mode=info.mode))
        return data


class ComponentSpec(ComponentOptions):
    """A registered component: ``type`` names it, the other keys are its options."""

    type: str = Field(description="Registered component name (see `streampetr plugins`).")


class ModelConfig(ComponentOptions):
    """The detector. Keys other than the sub-components are the detector's own options."""

    type: str = Field("streampetr", description="Registered detector name.")
    backbone: ComponentSpec = Field(description="Image backbone (registry: backbones).")
    neck: ComponentSpec = Field(description="Neck (registry: necks), sized from the backbone's output_shape().")
    roi_head: Optional[ComponentSpec] = Field(
        None, description="2D auxiliary head (registry: heads); null disables the 2D branch."
    )
    head: ComponentSpec = Field(description="3D detection head (registry: heads).")


class DataConfig(Section):
    class_names: List[str] = Field(
        default_factory=lambda: list(NUSCENES_CLASSES), min_length=1, description="Detection classes, in label order."
    )
    train: ComponentSpec = Field(description="Training dataset (registry: datasets).")
    val: ComponentSpec = Field(description="Evaluation dataset (registry: datasets).")
    batch_size_per_device: int = Field(2, ge=1, description="Training frames per device and step (streams per device).")
    val_batch_size_per_device: int = Field(1, ge=1, description="Evaluation frames per device and step.")
    num_workers: int = Field(4, ge=0, description="DataLoader worker processes per device.")
    pin_memory: bool = Field(True, description="Pin host memory of batches (ignored on CPU).")
    num_train_samples: Optional[int] = Field(
        None,
        ge=1,
        description="Samples per epoch for iteration accounting (the reference uses 28130); null: the dataset's length.",
    )


class GradClipConfig(Section):
    max_norm: float = Field(35.0, gt=0, description="Clip the global gradient norm to this value.")
    norm_type: float = Field(2.0, gt=0, description="Norm type of the clipped norm.")


class AmpConfig(Section):
    enabled: bool = Field(True, description="Mixed precision (on the CPU only with `cpu: bf16`).")
    dtype: Literal["fp16", "bf16"] = Field("fp16", description="Autocast dtype on NPU and CUDA.")
    cpu: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="What the CPU runs: fp32 (the reference's CPU arithmetic), or bf16 autocast of the same "
        "scope, for CPUs with native bf16 dot products (AVX512_BF16, AMX): about twice the convolutions' "
        "throughput; its numerics in docs/benchmarks.md.",
    )
    scope: Literal["backbone_neck", "full"] = Field(
        "backbone_neck",
        description="What runs under autocast: the reference autocasts only backbone and neck; 'full' the whole model.",
    )
    loss_scale: Union[Literal["dynamic"], float] = Field(
        "dynamic", description="'dynamic' (fp16 only) or a fixed scale factor."
    )
    init_scale: float = Field(65536.0, gt=0, description="Initial dynamic loss scale (GradScaler's default 2^16).")
    growth_interval: int = Field(2000, ge=1, description="Steps without overflow before the scale doubles.")


class GeometricWarmStartConfig(Section):
    steps: int = Field(
        0, ge=0,
        description="Adam steps of the label-free geometric warm start of the StreamPETR head before the "
        "first iteration (training/geometric_warm_start.py, docs/demo.md); 0: off, as the reference. "
        "For training from scratch in few iterations; pair it with small lr_multipliers on the modules "
        "it trains.",
    )
    lr: float = Field(2e-3, gt=0, description="Learning rate of the warm start's Adam.")
    points: int = Field(256, ge=1, description="Random 3D points per frame and step.")
    frames: int = Field(8, ge=1, description="Training frames, spread over the training set, whose cameras it uses.")


class EmaConfig(Section):
    enabled: bool = Field(
        False,
        description="Keep an exponential moving average of the weights (training/ema.py) and evaluate and save "
        "it as the run's weights (checkpoint 'state_dict'; the trained ones under 'trained_state_dict'); off, "
        "as the reference.",
    )
    decay: float = Field(
        0.999, gt=0, lt=1,
        description="Long-run decay per optimiser step; the first steps use min(decay, (1 + n) / (10 + n)).",
    )


class OptimizationConfig(Section):
    optimizer: ComponentSpec = Field(description="Optimiser (registry: optimizers), e.g. adamw with lr, weight_decay.")
    lr_multipliers: Dict[str, float] = Field(
        default_factory=lambda: {"img_backbone": 0.1},
        description="Substring of a parameter name -> learning-rate multiplier (longest matching key wins, as mmcv).",
    )
    grad_clip: Optional[GradClipConfig] = Field(default_factory=GradClipConfig, description="Gradient clipping; null: off.")
    amp: AmpConfig = Field(default_factory=AmpConfig, description="Mixed precision.")
    lr_scheduler: ComponentSpec = Field(description="Learning-rate schedule (registry: lr_schedulers).")
    geometric_warm_start: GeometricWarmStartConfig = Field(
        default_factory=GeometricWarmStartConfig, description="Geometric warm start of the head; off by default."
    )
    ema: EmaConfig = Field(default_factory=EmaConfig, description="Moving average of the weights; off by default.")


class RuntimeConfig(Section):
    epochs: Optional[int] = Field(24, ge=1, description="Training length in epochs (iteration-based, as the reference).")
    max_iters: Optional[int] = Field(None, ge=1, description="Training length in iterations; overrides epochs.")
    iters_per_epoch: Optional[int] = Field(
        None, ge=1, description="Iterations per epoch; null: num_train_samples // (devices x batch_size_per_device)."
    )
    eval_interval: int = Field(0, ge=0, description="Evaluate every N iterations; 0: only at the end.")
    evaluate_at_end: bool = Field(True, description="Evaluate once training finished.")
    checkpoint_interval: Optional[int] = Field(
        None, ge=1, description="Save a checkpoint every N iterations; null: once per epoch."
    )
    keep_last: int = Field(3, ge=1, description="Checkpoints kept on disk (older ones are deleted).")
    resume: str = Field(
        "auto", description="'auto': continue from the newest complete checkpoint in work_dir; 'none'; or a path."
    )
    load_from: Optional[str] = Field(
        None, description="Pretrained or reference weights (.pth, mmcv layout or backbone-only) loaded before training."
    )
    log_interval: int = Field(50, ge=1, description="Log metrics every N iterations.")
    seed: int = Field(0, ge=0, description="Random seed (all ranks).")
    work_dir: str = Field(
        "work_dirs/{recipe}", description="Run directory; '{recipe}' is replaced by the recipe's name."
    )
    tensorboard: bool = Field(False, description="Also write TensorBoard scalars (needs the tensorboard extra).")
    progress_bar: AutoOnOff = Field("auto", description="Rank-0 progress bar; 'auto': on a TTY.")
    max_nonfinite_steps: int = Field(
        20, ge=1, description="Stop with an error after this many steps in a row skipped as non-finite."
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: object) -> object:
        """Accept ``max_consecutive_nonfinite``, the old name of ``max_nonfinite_steps``, with a warning."""
        if isinstance(data, dict) and "max_consecutive_nonfinite" in data:
            logger.warning("runtime.max_consecutive_nonfinite is deprecated: use runtime.max_nonfinite_steps")
            data = dict(data)
            data.setdefault("max_nonfinite_steps", data.pop("max_consecutive_nonfinite"))
        return data


class AdapterSwitch(ComponentOptions):
    """Turn one adapter on or off; other keys are the adapter's options."""

    enabled: bool = Field(True, description="Apply this adapter when its precheck passes.")


class AcceleratorConfig(Section):
    device: Literal["auto", "npu", "cuda", "cpu"] = Field(
        "auto", description="Device kind; 'auto' checks NPU, then CUDA, then falls back to CPU."
    )
    distributed_backend: Literal["auto", "hccl", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend; 'auto': hccl on NPU, nccl on CUDA, gloo on CPU."
    )
    adapters: Dict[str, AdapterSwitch] = Field(
        default_factory=dict, description="Per-adapter switches and options (see `streampetr plugins`)."
    )


DEFAULT_TRACKER = "query_propagation"


class TrackingConfig(ComponentOptions):
    """Multi-object tracking on the detector's output. Keys other than ``type`` and ``evaluate`` are the
    tracker's options."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    type: str = Field(DEFAULT_TRACKER, description="Registered tracker name (registry: trackers).")
    evaluate: bool = Field(
        False,
        description="Also track the val set and score the nuScenes tracking metric (AMOTA) at every "
        "evaluation (docs/tracking.md).",
    )


class Recipe(Section):
    """A complete, validated StreamPETR recipe."""

    name: str = Field(description="Recipe name (used in the run directory).")
    description: str = Field("", description="What this recipe is for.")
    model: ModelConfig = Field(description="The detector.")
    data: DataConfig = Field(description="Datasets and loading.")
    optimization: OptimizationConfig = Field(description="Optimiser, schedule, precision, clipping.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Length, evaluation, checkpoints, logging.")
    accelerator: AcceleratorConfig = Field(
        default_factory=AcceleratorConfig, description="Device, distributed backend and adapters."
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Tracker and whether evaluations score tracking."
    )

    _source: Optional[str] = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _length_is_defined(self) -> "Recipe":
        if self.runtime.max_iters is None and self.runtime.epochs is None:
            raise ValueError("runtime: set either epochs or max_iters")
        return self

    @property
    def source(self) -> Optional[str]:
        """The recipe file this was loaded from."""
        return self._source

    def work_dir(self) -> str:
        return self.runtime.work_dir.replace("{recipe}", self.name)
