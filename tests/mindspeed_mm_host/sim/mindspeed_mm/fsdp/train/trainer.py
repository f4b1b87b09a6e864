"""SIMULATION of ``mindspeed_mm/fsdp/train/trainer.py`` (#4, #26, #27).

Order in ``__init__``: initialize (seed, ``import_plugin`` BEFORE the process group, then the
process group and parallel state) -> model (``ModelHub.build`` or ``model_provider()`` with no
arguments) -> parallel wrapping -> optimiser -> dataloader (``get_dataloader`` or
``dataloader_provider(args)``, a loader or ``(train, val)``) -> checkpoint formats -> train_iters ->
lr scheduler -> ``TrainEngine`` (which loads ``training.load``). ``python -m`` this module with a
YAML path runs the stock entry: parse, build, train.
"""

import logging
import os
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mindspeed_mm.config.config_manager import ConfigManager
from mindspeed_mm.fsdp.checkpoint.dcp_checkpointer import resolve_formats
from mindspeed_mm.fsdp.data import build_mm_dataloader, build_mm_dataset
from mindspeed_mm.fsdp.distributed.parallel_state import get_parallel_state, init_parallel_state
from mindspeed_mm.fsdp.distributed.parallelize import apply_parallel
from mindspeed_mm.fsdp.models.modelhub import ModelHub
from mindspeed_mm.fsdp.optimizer.lr_scheduler import build_lr_scheduler
from mindspeed_mm.fsdp.optimizer.optimizer import build_optimizer
from mindspeed_mm.fsdp.params.argument import Arguments
from mindspeed_mm.fsdp.train.train_engine import TrainEngine
from mindspeed_mm.fsdp.utils.log import print_rank, set_log_level
from mindspeed_mm.fsdp.utils.register import import_plugin
from mindspeed_mm.fsdp.utils.utils import set_seed

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self,
        args: Arguments,
        model_provider: Optional[Callable] = None,
        dataloader_provider: Optional[Callable] = None,
    ) -> None:
        self.args = args
        self.initialize()
        self.model = self.get_model(model_provider)
        self.optimizer = self.get_optimizer()
        result = self.get_dataloader() if dataloader_provider is None else dataloader_provider(args)
        self.train_dataloader = result[0] if isinstance(result, tuple) else result
        self.val_dataloader = result[1] if isinstance(result, tuple) else None
        resolve_formats(args.training)
        self._validate_and_set_train_iters(args)
        self.lr_scheduler = self.get_scheduler()
        self.trainer = TrainEngine(
            args,
            self.train_dataloader,
            self.model,
            self.optimizer,
            self.lr_scheduler,
            val_dataloader=self.val_dataloader,
        )

    def initialize(self) -> None:
        args = self.args
        set_log_level()
        set_seed(args.training.seed, set_deterministic=args.training.use_deter_comp)
        self.process_group_at_plugin_import = dist.is_initialized()
        import_plugin(getattr(args.training, "plugin", []))
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
        init_parallel_state(**args.parallel.to_dict())

    def get_model(self, model_provider: Optional[Callable] = None) -> torch.nn.Module:
        model = (
            ModelHub.build(self.args.model, self.args.training)
            if model_provider is None
            else model_provider()
        )
        return apply_parallel(model, self.args.parallel.fsdp_plan, self.args.training)

    def get_optimizer(self) -> torch.optim.Optimizer:
        training = self.args.training
        return build_optimizer(
            self.model,
            lr=training.lr,
            betas=(training.adam_beta1, training.adam_beta2),
            eps=training.adam_eps,
            weight_decay=training.weight_decay,
            fused=training.adam_fused,
            optimizer_type=training.optimizer,
            lr_scaling_plan=training.lr_scaling_plan,
        )

    def get_scheduler(self):
        training = self.args.training
        return build_lr_scheduler(
            self.optimizer,
            train_steps=training.train_iters,
            lr=training.lr,
            lr_min=training.lr_min,
            lr_decay_style=training.lr_decay_style,
            lr_decay_ratio=training.lr_decay_ratio,
            lr_warmup_ratio=training.lr_warmup_ratio,
            lr_start=training.lr_start,
        )

    def get_dataloader(self):
        args = self.args
        datasets = build_mm_dataset(args.data.dataset_param)
        train_dataset, val_dataset = datasets if isinstance(datasets, tuple) else (datasets, None)
        val_enabled = args.training.val_interval > 0
        if val_enabled and args.data.val_dataset_param is not None:
            val_dataset = build_mm_dataset(args.data.val_dataset_param)
            if isinstance(val_dataset, tuple):
                val_dataset = val_dataset[0]
        params = args.data.dataloader_param.to_dict()
        params.update({"batch_size": args.training.micro_batch_size, "seed": args.training.seed})
        build = partial(
            build_mm_dataloader,
            process_group=get_parallel_state().get_dp_group(),
            dataset_param=args.data.dataset_param,
            model=self.model,
        )
        train_loader = build(train_dataset, params)
        val_loader = None
        if val_enabled and val_dataset is not None:
            val_params = args.data.dataloader_param.to_dict()
            val_params.update(
                {
                    "batch_size": args.training.val_micro_batch_size or args.training.micro_batch_size,
                    "seed": args.training.seed,
                    "shuffle": False,
                    "drop_last": False,
                }
            )
            if val_params.get("sampler_type") == "BaseRandomBatchSampler":
                raise ValueError(
                    "Validation requires drop_last=False, but BaseRandomBatchSampler does not support it."
                )
            val_loader = build(val_dataset, val_params)
        if val_enabled and val_loader is None:
            raise ValueError("`val_interval > 0` but no validation dataloader is found.")
        return train_loader, val_loader

    def _validate_and_set_train_iters(self, args: Arguments) -> None:
        """``train_epochs`` treats ``len(loader)`` as a sample count (the host sampler's ``__len__``)."""
        if args.training.train_epochs is None:
            return
        per_epoch = len(self.train_dataloader) // args.training.global_batch_size
        args.training.train_iters = args.training.train_epochs * per_epoch
        print_rank(logger.info, f"Total training iterations: {args.training.train_iters}")

    def train(self) -> None:
        self.trainer.train()


def main() -> None:
    os.environ.setdefault("NON_MEGATRON", "true")
    arguments = ConfigManager(config_class=Arguments).load_and_parse()
    Trainer(args=arguments).train()


if __name__ == "__main__":
    main()
