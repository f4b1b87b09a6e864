"""``python -m streampetr_plugin.integrations.mindspeed_mm.train CONFIG.yaml [a.b=value ...]``

MindSpeed-MM's documented task-specific entry: its own ``Trainer`` and ``TrainEngine``, unchanged
except for what configuration alone cannot do (settings in ``training.streampetr``):

* the recipe's exact learning-rate schedule (``lr_schedule: recipe``) instead of the host's
  linear-warmup-then-cosine approximation;
* every StreamPETR loss term, averaged over ranks, in the host's log line (``log_loss_terms``);
* the data loader gets a dedicated random generator (per rank), so creating its iterator does not
  consume the global torch RNG that query denoising, dropout and GridMask draw from: the model's
  random stream is then the one ``streampetr-run`` has;
* after training, detection evaluation on the recipe's val set with StreamPETR's nuScenes metric
  (``evaluate_at_end``).

The host modules are imported inside :func:`trainer_class`, never when the host walks this package.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Dict, List

import torch

from streampetr_plugin.integrations.mindspeed_mm.config import (
    HostDatasetParams,
    HostModelParams,
    HostTrainingParams,
    read_block,
)
from streampetr_plugin.integrations.mindspeed_mm.settings import settings_mismatches

logger = logging.getLogger(__name__)

# With the recipe's own schedule these host keys are not used.
HOST_SCHEDULE_KEYS = frozenset({"lr_decay_style", "lr_warmup_ratio", "lr_start", "lr_min"})


def _recipe_of(args: Any, host: Any) -> Any:
    from streampetr_plugin import load_recipe

    params = read_block(args.model, HostModelParams)
    return load_recipe(params.recipe, params.recipe_overrides, host)


def check_blocks_agree(args: Any) -> None:
    """The model and the dataset must come from one recipe, and agree on the streams per device."""
    model = read_block(args.model, HostModelParams)
    data = read_block(args.data.dataset_param.to_dict(), HostDatasetParams)
    if (model.recipe, model.recipe_overrides) != (data.recipe, data.recipe_overrides):
        raise ValueError(
            "model.streampetr and data.dataset_param.streampetr name different recipes or overrides: "
            f"{model.recipe} {model.recipe_overrides} vs {data.recipe} {data.recipe_overrides}"
        )
    if data.micro_batch_size != args.training.micro_batch_size:
        raise ValueError(
            f"data.dataset_param.streampetr.micro_batch_size is {data.micro_batch_size} but "
            f"training.micro_batch_size is {args.training.micro_batch_size}: they must be equal"
        )


def mean_loss_terms(captured: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Micro-step mean of every term, as 0-d fp32 tensors, names sorted (the same order on every rank)."""
    names = sorted(captured[0]) if captured else []
    return {
        name: torch.stack([terms[name].float().reshape(()) for terms in captured]).mean() for name in names
    }


@functools.lru_cache(maxsize=None)
def trainer_class() -> type:
    """``StreamPETRTrainer``, a subclass of MindSpeed-MM's ``Trainer`` (built on first use)."""
    from mindspeed_mm.fsdp.train.train_engine import TrainEngine
    from mindspeed_mm.fsdp.train.trainer import Trainer

    class StreamPETRTrainEngine(TrainEngine):
        """The host's engine; ``train_step`` also reports the loss terms of its micro-steps."""

        def train_step(self, train_dataloader_iter: Any) -> Dict[str, float]:
            captured: List[Dict[str, torch.Tensor]] = []
            handle = self.model.register_forward_hook(
                lambda _m, _a, output: captured.append(output.loss_terms)
            )
            try:
                loss_dict = super().train_step(train_dataloader_iter)
            finally:
                handle.remove()
            terms = mean_loss_terms(captured)
            if terms:
                averaged = self.average_losses_across_data_parallel_group(list(terms.values()))
                loss_dict.update(zip(terms, averaged.tolist()))
            return loss_dict

    class StreamPETRTrainer(Trainer):
        """The host's trainer with the additions listed in the module docstring."""

        def __init__(self, args: Any, **providers: Any) -> None:
            from streampetr_plugin.host import create_plugin_host

            self.plugins = create_plugin_host()
            self.recipe = _recipe_of(args, self.plugins)
            self.settings = read_block(args.training, HostTrainingParams, required=False)
            self.eval_metrics: Dict[str, Any] = {}
            self._report_mismatches(args)
            check_blocks_agree(args)
            super().__init__(args, **providers)
            if self.settings.log_loss_terms:
                self.trainer.__class__ = StreamPETRTrainEngine

        def _report_mismatches(self, args: Any) -> None:
            ignored = HOST_SCHEDULE_KEYS if self.settings.lr_schedule == "recipe" else frozenset()
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            for key, host, recipe in settings_mismatches(self.recipe, world_size, args.training):
                if key not in ignored and int(os.environ.get("RANK", "0")) == 0:
                    logger.warning(
                        "training.%s is %r; recipe %s implies %r", key, host, self.recipe.name, recipe
                    )
            if self.recipe.optimization.ema.enabled and int(os.environ.get("RANK", "0")) == 0:
                logger.warning("optimization.ema is not applied under the host's trainer: its checkpoints and "
                               "evaluations use the trained weights")

        def get_scheduler(self) -> Any:
            if self.settings.lr_schedule == "host":
                return super().get_scheduler()
            from torch.optim.lr_scheduler import LambdaLR

            spec = self.recipe.optimization.lr_scheduler
            factor = self.plugins.registries.lr_schedulers.build(
                spec.type, spec.arguments, max_iters=self.args.training.train_iters
            )
            return LambdaLR(self.optimizer, factor)

        def get_dataloader(self) -> Any:
            loaders = super().get_dataloader()
            train_loader = loaders[0] if isinstance(loaders, tuple) else loaders
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            # Any dedicated generator keeps the loader's per-epoch seed draw off the global RNG.
            generator = torch.Generator()
            generator.manual_seed(self.recipe.runtime.seed + rank)
            train_loader.generator = generator
            return loaders

        def train(self) -> None:
            super().train()
            if self.settings.evaluate_at_end:
                from streampetr_plugin.integrations.mindspeed_mm.evaluation import evaluate_detector

                model = getattr(self.model, "module", self.model)
                self.eval_metrics = evaluate_detector(model, self.recipe, self.plugins.registries,
                                                      self.settings.eval_dir)

    return StreamPETRTrainer


def main() -> None:
    """Parse the host YAML from ``sys.argv`` (as the host does), build the trainer, train, evaluate."""
    from mindspeed_mm.config.config_manager import ConfigManager
    from mindspeed_mm.fsdp.params.argument import Arguments

    trainer_class()(ConfigManager(config_class=Arguments).load_and_parse()).train()


if __name__ == "__main__":
    main()
