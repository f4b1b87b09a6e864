"""SIMULATION of ``mindspeed_mm/fsdp/params/*.py``: the host's pydantic v2 argument tree.

#1: every section is pydantic with ``extra='allow'`` and ``validate_assignment``: unknown keys stay
attributes (nested mappings stay plain dicts) and appear in ``to_dict()``; fields without a default
are required (``dataset_type``; ``dataloader_mode``, ``sampler_type``, ``shuffle``, ``drop_last``,
``pin_memory``). #2: ``TrainingArguments``/``ParallelArguments`` read ``LOCAL_RANK``, ``RANK`` and
``WORLD_SIZE`` with ``int(os.getenv(...))`` while parsing. #3: ``gradient_accumulation_steps: null``
means 1, ``global_batch_size = mbs * dp * gas``, and ``lr >= lr_start``, ``lr >= lr_min``.
"""

import os
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class BaseArguments(BaseModel):
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump()


def _rank_environment() -> Dict[str, int]:
    return {
        "local_rank": int(os.getenv("LOCAL_RANK")),
        "global_rank": int(os.getenv("RANK")),
        "world_size": int(os.getenv("WORLD_SIZE")),
    }


class FSDPPlanConfig(BaseArguments):
    ignored_modules: List[str] = Field(default_factory=list)
    apply_modules: List[str] = Field(default_factory=list)
    param_dtype: Optional[str] = None
    reduce_dtype: Optional[str] = None
    output_dtype: Optional[str] = None
    cast_forward_inputs: bool = True
    reshard_after_forward: bool = True
    cpu_offload: bool = False


class ParallelArguments(BaseArguments):
    data_parallel_size: Optional[int] = None
    fully_shard_parallel_size: Union[str, int] = "auto"
    fsdp_plan: FSDPPlanConfig = Field(default_factory=FSDPPlanConfig)
    tensor_parallel_size: int = 1

    def model_post_init(self, __context: Any) -> None:
        env = _rank_environment()
        self.world_size = env["world_size"]
        if self.fully_shard_parallel_size == "auto":
            self.fully_shard_parallel_size = env["world_size"] // self.tensor_parallel_size
        else:
            self.fully_shard_parallel_size = int(self.fully_shard_parallel_size)
        if self.tensor_parallel_size != 1:
            raise ValueError("Tensor parallel size not supported yet.")
        if env["world_size"] % self.fully_shard_parallel_size != 0:
            raise ValueError("World size should be a multiple of fully_shard_parallel_size.")
        if self.data_parallel_size is None:
            self.data_parallel_size = env["world_size"]


class ModelArguments(BaseArguments):
    model_id: Optional[str] = None
    model_name_or_path: Optional[str] = None
    trust_remote_code: bool = False
    freeze: List[str] = Field(default_factory=list)


class BasicDataArguments(BaseArguments):
    """The LLaMA-Factory-style defaults every ``basic_parameters`` block carries."""

    template: Optional[str] = None
    dataset_dir: str = "data"
    dataset: Optional[Union[str, List[str]]] = None
    cutoff_len: int = 1024
    streaming: bool = False
    preprocessing_num_workers: Optional[int] = None
    max_samples: Optional[int] = None
    stage: Optional[str] = None

    def model_post_init(self, __context: Any) -> None:
        if self.stage is None:
            self.stage = "sft"
        if self.stage not in ("sft", "pretrain", "rm"):
            raise ValueError(f"not support stage: {self.stage}")


class ProcessorArguments(BaseArguments):
    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32


class DataSetArguments(BaseArguments):
    dataset_type: str
    basic_parameters: BasicDataArguments = Field(default_factory=BasicDataArguments)
    preprocess_parameters: Optional[ProcessorArguments] = Field(default_factory=ProcessorArguments)


class CollateArguments(BaseArguments):
    collator_id: Optional[str] = None
    model_name: Optional[str] = None
    ignore_pad_token_for_loss: bool = False
    pad_to_multiple_of: int = 8


class DataloaderArguments(BaseArguments):
    dataloader_mode: str
    sampler_type: str
    shuffle: Optional[bool]
    drop_last: bool
    pin_memory: bool
    collate_param: CollateArguments = Field(default_factory=CollateArguments)
    num_workers: int = 2
    enable_preload: bool = False


class DataArguments(BaseArguments):
    dataset_param: DataSetArguments
    val_dataset_param: Optional[DataSetArguments] = None
    dataloader_param: DataloaderArguments


class LearningRateScalingPlanArguments(BaseArguments):
    match: str
    scale: float = 1.0


class TrainingArguments(BaseArguments):
    lr: float = 5e-5
    lr_min: float = 0.0
    lr_start: float = 0.0
    weight_decay: float = 0.0
    no_decay_modules: List[str] = Field(default_factory=list)
    no_decay_params: List[str] = Field(default_factory=list)
    optimizer: Literal["adamw", "adamw_swap", "muon"] = "adamw"
    adam_fused: bool = True
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    clip_grad_foreach: bool = True
    micro_batch_size: int = 1
    gradient_accumulation_steps: Optional[int] = None
    lr_warmup_ratio: float = 0.0
    lr_decay_style: str = "constant"
    lr_decay_ratio: float = 1.0
    seed: int = 42
    use_deter_comp: bool = False
    init_model_with_meta_device: bool = False
    train_iters: int = 10000
    train_epochs: Optional[int] = None
    load: Optional[str] = None
    load_format: Literal["auto", "hf", "dcp"] = "auto"
    save: Optional[str] = None
    save_format: Literal["auto", "hf", "dcp"] = "auto"
    save_interval: int = 1
    load_strict: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False
    no_save_rng: bool = False
    log_interval: int = 1
    val_interval: int = 0
    val_micro_batch_size: Optional[int] = None
    plugin: List[str] = Field(default_factory=list)
    lr_scaling_plan: Optional[List[LearningRateScalingPlanArguments]] = None

    def model_post_init(self, __context: Any) -> None:
        env = _rank_environment()
        self.local_rank, self.global_rank, self.world_size = (
            env["local_rank"],
            env["global_rank"],
            env["world_size"],
        )
        if self.val_interval < 0:
            raise ValueError("val_interval must be >= 0.")
        if self.lr < self.lr_start:
            raise ValueError(
                f"Learning rate {self.lr} < starting lr {self.lr_start}. Check scheduler configuration."
            )
        if self.lr < self.lr_min:
            raise ValueError(
                f"Learning rate {self.lr} < minimum lr {self.lr_min}. Check scheduler configuration."
            )

    def compute_distributed_training(self, parallel: ParallelArguments) -> None:
        data_parallel_size = parallel.data_parallel_size or 1
        if self.gradient_accumulation_steps is None:
            self.gradient_accumulation_steps = 1
        self.global_batch_size = self.micro_batch_size * data_parallel_size * self.gradient_accumulation_steps


class LossArguments(BaseArguments):
    loss_type: Optional[str] = "raw"


class FeatureArguments(BaseArguments):
    loss_cfg: LossArguments = Field(default_factory=LossArguments)


class ToolsArguments(BaseArguments):
    profile: Dict[str, Any] = Field(default_factory=lambda: {"enable": False})
    memory_profile: Dict[str, Any] = Field(default_factory=lambda: {"enable": False})


class Arguments(BaseArguments):
    parallel: ParallelArguments = Field(default_factory=ParallelArguments)
    model: ModelArguments = Field(default_factory=ModelArguments)
    data: DataArguments
    training: TrainingArguments = Field(default_factory=TrainingArguments)
    tools: ToolsArguments = Field(default_factory=ToolsArguments)
    features: FeatureArguments = Field(default_factory=FeatureArguments)

    def model_post_init(self, __context: Any) -> None:
        self.training.compute_distributed_training(self.parallel)
