"""SIMULATION of ``mindspeed_mm/fsdp/train/train_engine.py`` (#15-#19, #21-#23).

Per iteration: ``gradient_accumulation_steps`` micro-steps of ``next(iterator)`` ->
``move_to_device(batch, param_dtype)`` -> (FSDP or meta init: ``set_is_last_backward`` /
``set_requires_all_reduce`` on the root) -> ``model(**batch, use_cache=False)`` -> ``output.loss / GAS``
(attribute access: a dict output fails) plus ``mean(output.mtp_loss) * 0.1`` when present ->
``backward``; ``output.aux_loss`` is only logged. Then the loss is averaged over the DP group,
gradients clipped, ``optimizer.step``, ``lr_scheduler.step``, ``zero_grad``, consumed samples grow by
the global batch size, and rank 0 logs the host's line every ``log_interval`` with the lr of the step
just taken. ``loss_type`` other than ``raw`` installs an LM cross-entropy closure on the model.
"""

import logging
from datetime import datetime
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from mindspeed_mm.fsdp.checkpoint.dcp_checkpointer import DistributedCheckpointer
from mindspeed_mm.fsdp.data import build_iterations
from mindspeed_mm.fsdp.distributed.parallel_state import get_parallel_state
from mindspeed_mm.fsdp.optimizer.clip_grad_norm import clip_grad_norm
from mindspeed_mm.fsdp.utils.log import print_rank
from mindspeed_mm.fsdp.utils.utils import configure_hsdp_gradient_sync, get_dtype, move_to_device

logger = logging.getLogger(__name__)

LM_LOSS_TYPES = ("default", "per_sample_loss", "per_token_loss")


def build_loss_func(loss_type: str, **batch: Any):
    """#17: an LM cross-entropy over shifted ``batch['labels']``; unknown types raise when called."""

    def loss_function(logits: torch.Tensor, *_: Any) -> torch.Tensor:
        if loss_type not in LM_LOSS_TYPES:
            raise NotImplementedError(f"loss_type {loss_type} is not supported")
        labels = batch["labels"]
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    return loss_function


class TrainEngine:
    def __init__(
        self, args, train_dataloader, model, optimizer, scheduler, val_dataloader=None, **_: Any
    ) -> None:
        self.args = args
        self.model = model
        self.train_dataloader = train_dataloader
        self.val_dataloader = val_dataloader
        self.optimizer = optimizer
        self.lr_scheduler = scheduler
        self.iteration, self.consumed_train_samples = 0, 0
        self.log_lines = []
        if args.training.load:
            self.iteration, self.consumed_train_samples = self.load()

    def _param_dtype(self) -> Optional[torch.dtype]:
        name = self.args.parallel.fsdp_plan.param_dtype
        return get_dtype(name) if name else None

    def average_losses_across_data_parallel_group(self, losses) -> torch.Tensor:
        group = get_parallel_state().get_dp_group()
        averaged = torch.cat([loss.clone().detach().view(1) for loss in losses])
        dist.all_reduce(averaged, group=group)
        return averaged / dist.get_world_size(group=group)

    def get_batch(self, iterator) -> Dict[str, Any]:
        return move_to_device(next(iterator), self._param_dtype())

    def set_loss_func(self, batch: Dict[str, Any]) -> None:
        loss_type = self.args.features.loss_cfg.loss_type
        if loss_type == "raw":
            return
        self.model.loss_function = build_loss_func(loss_type, **batch)

    def train_step(self, iterator) -> Dict[str, float]:
        args = self.args
        gas = args.training.gradient_accumulation_steps
        total_loss: Any = 0
        total_aux = None
        for step in range(gas):
            batch = self.get_batch(iterator)
            self.set_loss_func(batch)
            if (
                get_parallel_state().fully_shard_parallel_size > 1
                or args.training.init_model_with_meta_device
            ):
                configure_hsdp_gradient_sync(self.model, step == gas - 1)
            output = self.model(**batch, use_cache=False)
            loss = output.loss / gas
            total_loss += loss
            mtp_loss = getattr(output, "mtp_loss", None)
            if mtp_loss is not None:
                loss = loss + torch.mean(torch.stack(mtp_loss)) / gas * 0.1
            loss.backward()
            if getattr(output, "aux_loss", None) is not None:
                aux = output.aux_loss / gas
                total_aux = aux if total_aux is None else total_aux + aux
        loss_dict = {"loss": self.average_losses_across_data_parallel_group([total_loss]).item()}
        if total_aux:
            loss_dict["aux loss"] = total_aux.item()
        return loss_dict

    @torch.no_grad()
    def evaluate(self):
        """#22: the whole val loader once, eval mode, mean ``output.loss`` over DP."""
        loss_sum, steps = 0.0, 0
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in self.val_dataloader:
                batch = move_to_device(batch, self._param_dtype())
                output = self.model(**batch, use_cache=False)
                loss_sum = loss_sum + output.loss.detach().float()
                steps += 1
        finally:
            if was_training:
                self.model.train()
        if steps == 0:
            return None, 0
        stats = torch.stack([loss_sum, loss_sum.new_tensor(steps)])
        dist.all_reduce(stats, group=get_parallel_state().get_dp_group())
        return stats[0] / stats[1], int(stats[1].item())

    def train(self) -> None:
        args = self.args
        if args.training.val_interval > 0 and self.val_dataloader is None:
            raise ValueError("`val_interval > 0` but val_dataloader is None.")
        iterator = build_iterations(self.train_dataloader)
        self.model.train()
        lr_of_step = self.lr_scheduler.get_last_lr()[0]
        while self.iteration < args.training.train_iters:
            dist.barrier()
            loss_dict = self.train_step(iterator)
            grad_norm = clip_grad_norm(
                self.model, max_norm=args.training.clip_grad, foreach=args.training.clip_grad_foreach
            )
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
            self.consumed_train_samples += args.training.global_batch_size
            self.iteration += 1
            if self.iteration % args.training.log_interval == 0:
                self.training_log(
                    self.iteration, 0.0, lr_of_step, self.consumed_train_samples, loss_dict, grad_norm
                )
            lr_of_step = self.lr_scheduler.get_last_lr()[0]
            if (
                args.training.save
                and args.training.save_interval > 0
                and self.iteration % args.training.save_interval == 0
            ):
                self.save(self.iteration, self.consumed_train_samples)
            if args.training.val_interval > 0 and self.iteration % args.training.val_interval == 0:
                val_loss, val_steps = self.evaluate()
                if val_loss is not None:
                    print_rank(
                        logger.info,
                        f" [{datetime.now():%Y-%m-%d %H:%M:%S}]"
                        f" ** validation after iteration {self.iteration} **"
                        f" | validation steps: {val_steps} | validation loss: {val_loss.item():.6E} |",
                    )
        if args.training.save:
            self.save(self.iteration, self.consumed_train_samples)

    def training_log(self, iteration, elapsed, lr, consumed, loss_dict, grad_norm) -> None:
        """#21: the host's per-iteration line, rank 0 only."""
        line = f" [{datetime.now():%Y-%m-%d %H:%M:%S}]"
        line += " iteration {:8d}/{:8d} |".format(iteration, self.args.training.train_iters)
        line += " consumed samples: {:12d} |".format(consumed)
        line += " elapsed time per iteration (ms): {:.1f} |".format(elapsed * 1000.0)
        line += " learning rate: {:.6E} |".format(lr)
        line += " global batch size: {:5d} |".format(self.args.training.global_batch_size)
        for name, value in loss_dict.items():
            line += f" {name}: {value:.6E} |"
        if grad_norm is not None:
            line += " grad norm: {:.3f} |".format(grad_norm)
        if dist.get_rank() == 0:
            self.log_lines.append(line)
        print_rank(logger.info, line)

    def save(self, iteration: int, consumed: int) -> None:
        training = self.args.training
        state: Dict[str, Any] = {
            "model": self.model,
            "extra_state": {
                "iteration": iteration,
                "consumed_train_samples": consumed,
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "train_dataloader": self.train_dataloader.state_dict(),
            },
        }
        if not training.no_save_optim:
            state["optimizer"] = self.optimizer
        if not training.no_save_rng:
            state["extra_state"]["torch_rng_state"] = torch.get_rng_state()
        DistributedCheckpointer.save(training.save, state, iteration)
        dist.barrier()

    def load(self):
        training = self.args.training
        state: Dict[str, Any] = {"model": self.model, "extra_state": {}}
        if not training.no_load_optim:
            state["optimizer"] = self.optimizer
        release = DistributedCheckpointer.load(training.load, state, load_strict=training.load_strict)
        iteration, consumed = 0, 0
        if not release:
            extra = state["extra_state"]
            iteration, consumed = extra["iteration"], extra["consumed_train_samples"]
            self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
            self.train_dataloader.load_state_dict(extra["train_dataloader"])
            if not training.no_load_rng and "torch_rng_state" in extra:
                torch.set_rng_state(extra["torch_rng_state"])
        dist.barrier()
        return iteration, consumed
