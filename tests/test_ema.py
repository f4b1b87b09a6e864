"""The moving average of the weights (``optimization.ema``): its arithmetic, evaluation with it, what
checkpoints hold and an exact resume."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
import torch
from torch import nn

from streampetr_plugin.config.loader import load_recipe
from streampetr_plugin.interop.checkpoint import read_checkpoint_state_dict
from streampetr_plugin.training.checkpointing import NonFiniteLossError, list_checkpoints, load_checkpoint
from streampetr_plugin.training.ema import WeightEMA
from streampetr_plugin.training.trainer import Trainer, train
from tests import trainer_helpers

HOST = trainer_helpers.standin_host()
DECAY = 0.9


def expected_averages(snapshots: List[Dict[str, torch.Tensor]], decay: float) -> Dict[str, torch.Tensor]:
    """The documented recurrence in float64: the first snapshot as it is, then after n updates
    ``average = d * average + (1 - d) * weights`` with ``d = min(decay, (1 + n) / (10 + n))``."""
    average = {name: value.double() for name, value in snapshots[0].items()}
    for updates, weights in enumerate(snapshots[1:], start=1):
        d = min(decay, (1 + updates) / (10 + updates))
        average = {name: d * average[name] + (1 - d) * weights[name].double() for name in average}
    return average


class SharedHead(nn.Module):
    """A trained layer reachable under two names (as the reference's shared branches), a frozen
    parameter and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.alias = self.layer
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("statistic", torch.zeros(2))


def test_average_follows_the_recurrence_and_covers_shared_names():
    torch.manual_seed(0)
    model, ema = SharedHead(), WeightEMA(decay=DECAY)
    snapshots = []
    for step in range(30):  # past the ramp: (1 + n) / (10 + n) exceeds 0.9 from n = 81, so the ramp rules here
        with torch.no_grad():
            model.layer.weight.copy_(torch.randn(2, 3))
            model.layer.bias.copy_(torch.randn(2))
            model.frozen.fill_(float(step))
            model.statistic.fill_(-float(step))
        snapshots.append({"weight": model.layer.weight.detach().clone(), "bias": model.layer.bias.detach().clone()})
        ema.update(model)
    expected = expected_averages(snapshots, DECAY)
    averaged = ema.averaged_state_dict(model)
    for prefix in ("layer.", "alias."):
        for name in ("weight", "bias"):
            torch.testing.assert_close(averaged[prefix + name].double(), expected[name], rtol=0, atol=1e-6)
    # Not averaged: the frozen parameter and the buffer are the model's own.
    assert torch.equal(averaged["frozen"], model.frozen) and torch.equal(averaged["statistic"], model.statistic)
    assert ema.updates == 30 and ema.state() == {"decay": DECAY, "updates": 30}


def test_long_run_decay_is_the_configured_one():
    ema = WeightEMA(decay=0.99)
    ema.updates = 5
    assert ema.rate() == pytest.approx(6 / 15)
    ema.updates = 10_000
    assert ema.rate() == 0.99


def test_applied_swaps_the_average_in_and_the_trained_weights_back():
    torch.manual_seed(1)
    model, ema = SharedHead(), WeightEMA(decay=DECAY)
    ema.update(model)
    with torch.no_grad():
        model.layer.weight.add_(1.0)
    trained = model.layer.weight.detach().clone()
    ema.update(model)
    average = ema.averaged_state_dict(model)["layer.weight"].clone()
    assert not torch.equal(average, trained)
    with ema.applied(model):
        assert torch.equal(model.layer.weight, average)
    assert torch.equal(model.layer.weight, trained)
    with pytest.raises(RuntimeError, match="inside"), ema.applied(model):
        raise RuntimeError("inside")
    assert torch.equal(model.layer.weight, trained)


def _recipe(path: Path, work_dir: Path, *overrides: str):
    return load_recipe(path, [f"runtime.work_dir={work_dir}", *overrides], host=HOST)


@pytest.fixture(scope="module")
def standin_recipe(tmp_path_factory):
    threads = torch.get_num_threads()
    yield trainer_helpers.write_recipe(tmp_path_factory.mktemp("recipe"))
    torch.set_num_threads(threads)


EMA_ON = ("optimization.ema.enabled=true", f"optimization.ema.decay={DECAY}")


def test_training_checkpoints_save_the_average_for_use_and_the_trained_weights_for_resume(
    standin_recipe, tmp_path
):
    # Without the average, a checkpoint after every iteration: the trained weights' history.
    train(_recipe(standin_recipe, tmp_path / "plain", "runtime.checkpoint_interval=1", "runtime.keep_last=10"),
          host=HOST)
    history = [load_checkpoint(path)["state_dict"] for _, path in list_checkpoints(tmp_path / "plain" / "checkpoints")]
    assert len(history) == 6
    trainer = Trainer(_recipe(standin_recipe, tmp_path / "ema", "runtime.checkpoint_interval=3", *EMA_ON), host=HOST)
    trainer.train()
    saved = load_checkpoint(tmp_path / "ema" / "checkpoints" / "iter_00000006.pth")

    # Keeping the average does not change training: the trained weights are the plain run's.
    assert saved["trained_state_dict"].keys() == history[-1].keys()
    assert all(torch.equal(saved["trained_state_dict"][key], history[-1][key]) for key in history[-1])
    assert saved["ema"] == {"decay": DECAY, "updates": 6}
    names = [name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad]
    expected = expected_averages([{name: weights[name] for name in names} for weights in history], DECAY)
    for name in names:
        torch.testing.assert_close(saved["state_dict"][name].double(), expected[name], rtol=0, atol=1e-6)
        assert not torch.equal(saved["state_dict"][name], history[-1][name])
    # What eval, export and load_from read is the average.
    loaded = read_checkpoint_state_dict(tmp_path / "ema" / "checkpoints" / "iter_00000006.pth")
    assert all(torch.equal(loaded[key], saved["state_dict"][key]) for key in saved["state_dict"])


class RecordingEvaluation:
    """Stands in for the run's evaluation: records the weights it is called with."""

    last_outputs = None

    def __init__(self) -> None:
        self.seen: List[Dict[str, torch.Tensor]] = []

    def __call__(self, model: nn.Module, **_: object) -> Dict[str, float]:
        self.seen.append({name: value.detach().clone() for name, value in model.state_dict().items()})
        return {}


def test_evaluation_sees_the_average_and_training_continues_from_the_trained_weights(standin_recipe, tmp_path):
    trainer = Trainer(_recipe(standin_recipe, tmp_path, "runtime.evaluate_at_end=true", *EMA_ON), host=HOST)
    trainer.setup()
    trainer.evaluation = recording = RecordingEvaluation()
    trainer.train()
    averaged = trainer.ema.averaged_state_dict(trainer.model)
    trained = trainer.model.state_dict()
    assert len(recording.seen) == 1
    assert all(torch.equal(recording.seen[0][name], averaged[name]) for name in averaged)
    assert any(not torch.equal(recording.seen[0][name], trained[name]) for name in trained)
    # The trained weights are back in the model after the evaluation.
    saved = load_checkpoint(tmp_path / "checkpoints" / "iter_00000006.pth")["trained_state_dict"]
    assert all(torch.equal(trained[name], saved[name]) for name in saved)


def test_resume_restores_the_average_exactly(standin_recipe, tmp_path):
    overrides = ("runtime.checkpoint_interval=3", *EMA_ON)
    train(_recipe(standin_recipe, tmp_path / "straight", *overrides), host=HOST)

    recipe = _recipe(standin_recipe, tmp_path / "crashed", *overrides)
    crashing = Trainer(recipe, host=HOST)
    crashing.setup()
    trainer_helpers.crash_on_training_forward(crashing.model, 5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    resumed = Trainer(recipe, host=HOST)
    resumed.setup()
    assert resumed.iteration == 3 and resumed.ema.updates == 3
    resumed.train()
    final = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "iter_00000006.pth")
    reference = load_checkpoint(tmp_path / "straight" / "checkpoints" / "iter_00000006.pth")
    for part in ("state_dict", "trained_state_dict"):
        assert all(torch.equal(final[part][key], reference[part][key]) for key in reference[part])
    assert final["ema"] == reference["ema"]


def test_a_nonfinite_average_is_never_saved(standin_recipe, tmp_path):
    trainer = Trainer(_recipe(standin_recipe, tmp_path, *EMA_ON), host=HOST)
    trainer.setup()
    poisoned = {name: torch.full_like(value, float("nan")) for name, value in trainer.model.state_dict().items()}
    trainer.ema.load(poisoned, updates=1, model=trainer.model)
    with pytest.raises(NonFiniteLossError, match=r"ema\."):
        trainer.save_checkpoint()
    assert list_checkpoints(tmp_path / "checkpoints") == []
