"""TrainStep and total_loss: the one training iteration of the trainer and the benchmark."""
import math

import torch
from torch import nn

from streampetr_plugin.adapters.device import DeviceHandle
from streampetr_plugin.config.schema import AmpConfig, GradClipConfig
from streampetr_plugin.models.outputs import TrainingOutputs
from streampetr_plugin.training.precision import MixedPrecision
from streampetr_plugin.training.step import TrainStep, total_loss


def test_total_loss_sums_tensor_and_list_entries_whose_name_says_loss():
    losses = {"loss_cls": torch.tensor(1.5), "d0.loss_bbox": [torch.tensor(0.25), torch.tensor(0.5)],
              "num_matched": torch.tensor(7.0)}
    total = total_loss(losses)
    assert total.dtype == torch.float32 and total.item() == 2.25


class Quadratic(nn.Module):
    """loss = (w - target)^2 per entry, plus a non-loss entry; NaN on request."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([3.0, 4.0]))
        self.poison = False

    def forward(self, batch):
        loss = ((self.weight - batch["target"]) ** 2).sum()
        if self.poison:
            loss = loss * float("nan")
        return TrainingOutputs(losses={"loss_main": loss, "accuracy": torch.tensor(0.5)})


def _step(model, clip=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = MixedPrecision(AmpConfig(enabled=False), DeviceHandle("cpu"))
    return TrainStep(model=model, optimizer=optimizer, precision=precision, grad_clip=clip)


def test_a_step_reports_every_term_the_total_and_the_gradient_norm_and_steps():
    model = Quadratic()
    result = _step(model)({"target": torch.zeros(2)})
    assert result.terms == {"loss_main": 25.0, "accuracy": 0.5, "loss": 25.0}
    assert math.isclose(result.grad_norm, 10.0) and not result.skipped  # |2 w| = |(6, 8)|
    assert torch.allclose(model.weight.detach(), torch.tensor([2.4, 3.2]))  # w - 0.1 * 2 w


def test_clipping_bounds_the_update_and_reports_the_norm_before_it():
    model = Quadratic()
    result = _step(model, GradClipConfig(max_norm=1.0))({"target": torch.zeros(2)})
    assert math.isclose(result.grad_norm, 10.0, rel_tol=1e-6)
    assert torch.allclose(model.weight.detach(), torch.tensor([3.0 - 0.06, 4.0 - 0.08]))


def test_a_non_finite_loss_skips_the_update():
    model = Quadratic()
    model.poison = True
    result = _step(model)({"target": torch.zeros(2)})
    assert result.skipped and math.isnan(result.terms["loss"])
    assert torch.equal(model.weight.detach(), torch.tensor([3.0, 4.0]))
