"""Test harness around the MindSpeed-MM SIMULATION in ``sim/`` (not MindSpeed-MM itself).

``simulated_host`` puts the simulated ``mindspeed_mm`` on ``sys.path`` with a torchrun-like
environment (one rank) and gives every test fresh registries by dropping the simulated package and
the integration package from ``sys.modules`` before and after. ``host_config`` turns an example
YAML of ``examples/mindspeed_mm`` into a tiny CPU run of ``tiny_recipe.yaml`` on the synthetic data.
"""

from __future__ import annotations

import contextlib
import copy
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

import pytest
import torch
import torch.distributed as dist
import yaml

HERE = Path(__file__).resolve().parent
SIM_ROOT = HERE / "sim"
REPO = HERE.parent.parent
EXAMPLES = REPO / "examples" / "mindspeed_mm"
TINY_RECIPE = HERE / "tiny_recipe.yaml"
PACKAGE = "streampetr_plugin.integrations.mindspeed_mm"


def purge_modules() -> None:
    """Forget the simulated host and the integration package (fresh registries on next import)."""
    for name in list(sys.modules):
        if name == "mindspeed_mm" or name.startswith(("mindspeed_mm.", PACKAGE)):
            del sys.modules[name]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def host_environment() -> Iterator[Path]:
    """The simulated host importable as ``mindspeed_mm``, one rank; yields the sim root."""
    purge_modules()
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(SIM_ROOT))
        for name, value in {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }.items():
            patch.setenv(name, value)
        try:
            yield SIM_ROOT
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            purge_modules()


@pytest.fixture
def simulated_host() -> Iterator[Path]:
    with host_environment() as root:
        yield root


def tiny_recipe_overrides(root: Path, version: str) -> List[str]:
    return [
        f"data.train.root={root}",
        f"data.val.root={root}",
        f"data.train.version={version}",
        f"data.val.version={version}",
    ]


def load_example(name: str = "streampetr_r50.yaml") -> Dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


def tiny_overrides(root: Path, version: str, *, micro_batch_size: int = 1, max_iters: int = 3) -> List[str]:
    return tiny_recipe_overrides(root, version) + [
        f"data.batch_size_per_device={micro_batch_size}",
        f"runtime.max_iters={max_iters}",
    ]


def host_config(
    root: Path,
    version: str,
    save_dir: Path,
    *,
    example: str = "streampetr_r50.yaml",
    train_iters: int = 3,
    micro_batch_size: int = 1,
    recipe_overrides: Sequence[str] = (),
) -> Dict[str, Any]:
    """The example YAML with the tiny recipe (and its ``training.*`` translation), synthetic data."""
    from streampetr_plugin import load_recipe
    from streampetr_plugin.integrations.mindspeed_mm.settings import recipe_training_settings

    config = copy.deepcopy(load_example(example))
    overrides = tiny_overrides(root, version, micro_batch_size=micro_batch_size, max_iters=train_iters)
    overrides += list(recipe_overrides)
    for block in (config["model"]["streampetr"], config["data"]["dataset_param"]["streampetr"]):
        block["recipe"] = str(TINY_RECIPE)
        block["recipe_overrides"] = list(overrides)
    config["data"]["dataset_param"]["streampetr"].update(micro_batch_size=micro_batch_size, epochs=1)
    config["data"]["dataloader_param"].update(num_workers=0, pin_memory=False)
    config["training"].update(recipe_training_settings(load_recipe(TINY_RECIPE, overrides), world_size=1))
    config["training"].update(adam_fused=False, save=str(save_dir), save_interval=1000, log_interval=1)
    config["training"]["streampetr"].update(eval_dir=str(save_dir / "eval"), evaluate_at_end=False)
    return config


def write_config(config: Dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def parse(config: Dict[str, Any], path: Path) -> Any:
    """The host's ``Arguments`` for ``config``, parsed from a YAML file as the host does."""
    from mindspeed_mm.config.config_manager import ConfigManager
    from mindspeed_mm.fsdp.params.argument import Arguments

    return ConfigManager(Arguments, argv=["train.py", str(write_config(config, path))]).load_and_parse()


def record_batches(model: torch.nn.Module) -> List[Dict[str, torch.Tensor]]:
    """The (scene, frame, sample) indices of every forward, as the model received them."""
    seen: List[Dict[str, torch.Tensor]] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(
            {k: kwargs[k].clone() for k in ("scene_idx", "frame_idx", "sample_idx")}
        ),
        with_kwargs=True,
    )
    return seen


@dataclass
class Run:
    """A finished run through the custom entry: its trainer, weights before, batches seen, losses."""

    trainer: Any
    initial: Dict[str, torch.Tensor]
    batches: List[Dict[str, torch.Tensor]]
    losses: List[float]
    save_dir: Path


def train_custom(config: Dict[str, Any], tmp: Path) -> Run:
    """Train ``config`` with the custom entry's trainer (call it inside ``host_environment``)."""
    from streampetr_plugin.integrations.mindspeed_mm.train import trainer_class

    trainer = trainer_class()(parse(config, tmp / "host.yaml"))
    initial = {k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()}
    batches = record_batches(trainer.model)
    losses: List[float] = []
    trainer.model.register_forward_hook(lambda _m, _a, output: losses.append(output.loss.item()))
    trainer.train()
    return Run(trainer, initial, batches, losses, Path(config["training"]["save"]))
