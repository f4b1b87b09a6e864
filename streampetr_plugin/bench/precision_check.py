"""How far mixed precision moves a training frame from fp32: ``streampetr bench RECIPE --precision DTYPE ...``.

One synthetic training frame of the recipe's shapes (batch 1, as the bench's steps), the model's initial
weights and the same random draws (GridMask, denoising noise) for every precision: forward and backward in
fp32 and under autocast of each dtype with the recipe's scope (backbone and neck; ``scope: full`` adds the
heads). Against fp32 it reports the relative L2 difference of the neck level the heads read (one inference
frame), the relative difference of the total loss and of the loss term that moved most, and the cosine of
the gradients over all parameters and per top-level module (backbone, neck, heads). On the CPU fp16
autocast runs oneDNN's emulation: many times slower, for the comparison only (training on the CPU offers
fp32 and bf16).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, ContextManager, Dict, List, Mapping, Sequence

import torch
from torch import nn

from streampetr_plugin.bench.synthetic_batch import SyntheticStreams, stream_shape
from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.training.precision import AUTOCAST_DTYPES
from streampetr_plugin.training.step import total_loss


@dataclass
class PrecisionComparison:
    """One autocast dtype against fp32 on the same frame (see the module docstring); ``seconds``: that
    precision's forward and backward."""

    dtype: str
    feature_rel_l2: float
    total_loss_rel: float
    worst_loss_term: str
    worst_loss_term_rel: float
    grad_cosine: float
    grad_cosine_per_module: Dict[str, float]
    seconds: float


@dataclass
class _FrameResult:
    features: torch.Tensor  # (N, C, h, w) float64: the neck level of one inference frame
    loss_terms: Dict[str, float]
    total_loss: float
    grads: Dict[str, torch.Tensor]  # top-level module -> its parameters' gradients, flat float64
    seconds: float


def _run_frame(
    model: nn.Module,
    initial_state: Mapping[str, torch.Tensor],
    *,
    train_batch: Mapping[str, Any],
    infer_batch: Mapping[str, Any],
    autocast: ContextManager[Any],
    seed: int,
) -> _FrameResult:
    model.load_state_dict(initial_state)  # BatchNorm statistics a previous forward moved, too
    model.zero_grad(set_to_none=True)
    model.stream_state.reset()
    model.train()
    torch.manual_seed(seed)  # the same GridMask and denoising draws for every precision
    start = time.perf_counter()
    with autocast:
        losses = model(train_batch).losses
    total = total_loss(losses)
    total.backward()
    seconds = time.perf_counter() - start
    grads: Dict[str, List[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grads.setdefault(name.split(".")[0], []).append(param.grad.detach().flatten().double().cpu())
    model.eval()
    model.stream_state.reset()
    with torch.no_grad(), autocast:
        features = model.extract_img_feats(infer_batch["img"])
    return _FrameResult(
        features=features.double().cpu(),
        loss_terms={
            key: float(value.detach()) for key, value in losses.items() if "loss" in key and torch.is_tensor(value)
        },
        total_loss=float(total.detach()),
        grads={module: torch.cat(parts) for module, parts in grads.items()},
        seconds=seconds,
    )


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _relative(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def compare_precisions(
    model: nn.Module, recipe: Recipe, *, device: torch.device, dtypes: Sequence[str]
) -> List[PrecisionComparison]:
    """fp32 against autocast in each of ``dtypes`` (``bf16``, ``fp16``) for ``model`` (on ``device``, its
    initial weights) on one synthetic frame of ``recipe``'s shapes."""
    seed = recipe.runtime.seed
    train_batch = SyntheticStreams(dataclasses.replace(stream_shape(recipe), batch_size=1), seed=seed).frame(0, device)
    infer_shape = dataclasses.replace(stream_shape(recipe, training=False), batch_size=1)
    infer_batch = SyntheticStreams(infer_shape, with_targets=False, seed=seed).frame(0, device)
    if hasattr(model, "head_autocast"):
        model.head_autocast = recipe.optimization.amp.scope == "full"
    initial_state = {key: value.detach().clone() for key, value in model.state_dict().items()}

    def run(autocast: ContextManager[Any]) -> _FrameResult:
        return _run_frame(model, initial_state, train_batch=train_batch, infer_batch=infer_batch,
                          autocast=autocast, seed=seed)

    reference = run(contextlib.nullcontext())
    comparisons = []
    for name in dtypes:
        result = run(torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[name]))
        term_moves = {key: _relative(value, reference.loss_terms[key]) for key, value in result.loss_terms.items()}
        worst = max(term_moves, key=term_moves.get)
        comparisons.append(
            PrecisionComparison(
                dtype=name,
                feature_rel_l2=float((result.features - reference.features).norm() / reference.features.norm()),
                total_loss_rel=_relative(result.total_loss, reference.total_loss),
                worst_loss_term=worst,
                worst_loss_term_rel=term_moves[worst],
                grad_cosine=_cosine(torch.cat(list(result.grads.values())), torch.cat(list(reference.grads.values()))),
                grad_cosine_per_module={
                    module: _cosine(grad, reference.grads[module]) for module, grad in result.grads.items()
                },
                seconds=result.seconds,
            )
        )
    return comparisons
