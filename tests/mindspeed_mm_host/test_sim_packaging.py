"""Plugin import, registration, configuration and model construction under the SIMULATED host.

Behaviours #1-#6, #25, #27 of the simulated host (numbered in its docstrings); each test would fail
if the integration relied on the opposite behaviour.
"""

import importlib
import json
import pkgutil
import re
import sys

import pytest
import torch
import torch.distributed as dist

from .harness import EXAMPLES, PACKAGE, TINY_RECIPE, tiny_recipe_overrides

EXAMPLE_NAMES = ["streampetr_r50.yaml", "streampetr_vov.yaml"]


def _walk_names():
    package = importlib.import_module(PACKAGE)
    return [
        name
        for _, name, is_pkg in pkgutil.walk_packages(package.__path__, prefix=f"{PACKAGE}.")
        if not is_pkg
    ]


def test_plugin_import_walks_every_module_before_the_process_group(simulated_host):
    # 4, 27: '/' paths, the whole subtree imported, no process group yet.
    from mindspeed_mm.fsdp.utils.register import data_register, import_plugin, model_register

    assert not dist.is_initialized()
    import_plugin(["streampetr_plugin/integrations/mindspeed_mm/"])
    assert not dist.is_initialized()
    assert model_register.get("streampetr").__name__ == "StreamPETRForMindSpeedMM"
    assert data_register.get("streampetr_nuscenes").__name__ == "StreamPETRNuScenesDataset"
    walked = _walk_names()
    assert f"{PACKAGE}.train" in walked and f"{PACKAGE}.codec" in walked
    assert all(name in sys.modules for name in walked)


def test_a_mistyped_plugin_path_is_only_printed_and_surfaces_as_an_unregistered_id(simulated_host, capsys):
    # 4: the host swallows ModuleNotFoundError of the top-level entry.
    from mindspeed_mm.fsdp.utils.register import import_plugin, model_register

    import_plugin(["streampetr_plugin.integrations.mindspeed_mn"])
    assert "Import failed" in capsys.readouterr().out
    with pytest.raises(KeyError, match="not registered"):
        model_register.get("streampetr")


def test_reimport_under_the_same_name_is_harmless_and_a_foreign_duplicate_raises(simulated_host):
    # 5: duplicate ids raise KeyError; our registration tolerates its own re-import only.
    from mindspeed_mm.fsdp.utils.register import model_register

    first = importlib.import_module(PACKAGE)
    for name in [n for n in sys.modules if n.startswith(PACKAGE)]:
        del sys.modules[name]
    second = importlib.import_module(PACKAGE)
    assert second is not first
    assert model_register.get("streampetr").__qualname__ == "StreamPETRForMindSpeedMM"

    class Impostor:
        pass

    with pytest.raises(KeyError, match="already registered"):
        model_register.register("streampetr")(Impostor)


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
def test_example_yaml_parses_with_cli_overrides_and_keeps_our_blocks(simulated_host, example):
    # 1, 2, 3: pydantic extra='allow', nested extras stay dicts, auto-typed CLI overrides, batch sizes.
    from mindspeed_mm.config.config_manager import ConfigManager
    from mindspeed_mm.fsdp.params.argument import Arguments

    from streampetr_plugin.integrations.mindspeed_mm.config import (
        HostDatasetParams,
        HostModelParams,
        HostTrainingParams,
        read_block,
    )

    argv = [
        "trainer.py",
        str(EXAMPLES / example),
        "training.train_iters=7",
        "training.streampetr.log_loss_terms=off",
    ]
    args = ConfigManager(Arguments, argv=argv).load_and_parse()
    assert isinstance(args.model.streampetr, dict)
    assert "streampetr" in args.data.dataset_param.to_dict()
    assert args.training.train_iters == 7
    assert args.training.global_batch_size == args.training.micro_batch_size == 2
    model = read_block(args.model, HostModelParams)
    data = read_block(args.data.dataset_param.to_dict(), HostDatasetParams)
    training = read_block(args.training, HostTrainingParams)
    assert model.recipe == data.recipe and data.micro_batch_size == args.training.micro_batch_size
    assert training.log_loss_terms is False
    assert args.data.dataloader_param.to_dict()["data_sharding"] is True


@pytest.mark.parametrize("missing", ["dataloader_mode", "sampler_type", "shuffle", "drop_last", "pin_memory"])
def test_required_dataloader_keys_are_in_the_examples_because_the_host_demands_them(
    simulated_host, tmp_path, missing
):
    # 1: fields without a default are required; the examples set every one.
    import yaml
    from mindspeed_mm.config.config_manager import ConfigManager, ConfigValidationError
    from mindspeed_mm.fsdp.params.argument import Arguments

    config = yaml.safe_load((EXAMPLES / EXAMPLE_NAMES[0]).read_text())
    assert missing in config["data"]["dataloader_param"]
    del config["data"]["dataloader_param"][missing]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigValidationError):
        ConfigManager(Arguments, argv=["trainer.py", str(tmp_path / "c.yaml")]).load_and_parse()


def test_parsing_needs_the_torchrun_environment(simulated_host, monkeypatch):
    # 2: the host reads RANK/LOCAL_RANK/WORLD_SIZE while parsing.
    from mindspeed_mm.config.config_manager import ConfigManager, ConfigValidationError
    from mindspeed_mm.fsdp.params.argument import Arguments

    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigValidationError):
        ConfigManager(Arguments, argv=["trainer.py", str(EXAMPLES / EXAMPLE_NAMES[0])]).load_and_parse()


def _model_args(tmp_path, synthetic_nuscenes, **fields):
    from mindspeed_mm.fsdp.params.argument import ModelArguments

    block = {
        "recipe": str(TINY_RECIPE),
        "recipe_overrides": tiny_recipe_overrides(synthetic_nuscenes.root, synthetic_nuscenes.version),
    }
    return ModelArguments(model_id="streampetr", streampetr=block, **fields)


def test_custom_route_builds_our_detector_with_reference_names_and_unprefixed_freeze(
    simulated_host, tmp_path, synthetic_nuscenes
):
    # 6: AutoConfig fails for null -> model_register -> from_pretrained(ModelArguments) -> .float() -> freeze.
    from mindspeed_mm.fsdp.models.modelhub import ModelHub
    from mindspeed_mm.fsdp.params.argument import TrainingArguments

    from streampetr_plugin import build_model, load_recipe
    from streampetr_plugin.integrations.mindspeed_mm import StreamPETRForMindSpeedMM

    importlib.import_module(PACKAGE)
    args = _model_args(tmp_path, synthetic_nuscenes, freeze=["img_backbone"])
    model = ModelHub.build(args, TrainingArguments())
    reference = build_model(load_recipe(TINY_RECIPE, args.streampetr["recipe_overrides"]))
    assert isinstance(model, StreamPETRForMindSpeedMM) and isinstance(model, type(reference))
    shared = {key for key in reference.state_dict() if re.search(r"_branches\.[1-9]\.", key)}
    assert shared and set(model.state_dict()) == set(reference.state_dict()) - shared  # stored once
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    fixed = {name for name, p in reference.named_parameters() if not p.requires_grad}  # e.g. pc_range
    backbone = {name for name, _ in model.img_backbone.named_parameters(prefix="img_backbone")}
    assert backbone and frozen == backbone | fixed
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_huggingface_model_path_takes_the_hf_route_and_is_refused_clearly(
    simulated_host, tmp_path, synthetic_nuscenes
):
    # 6: AutoConfig is tried first; a directory with config.json sends a path to from_pretrained.
    from mindspeed_mm.fsdp.models.modelhub import ModelHub
    from mindspeed_mm.fsdp.params.argument import TrainingArguments

    importlib.import_module(PACKAGE)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    args = _model_args(tmp_path, synthetic_nuscenes, model_name_or_path=str(tmp_path))
    with pytest.raises(ValueError, match="model_name_or_path: null"):
        ModelHub.build(args, TrainingArguments())


def test_meta_device_initialisation_is_refused_clearly(simulated_host, tmp_path, synthetic_nuscenes):
    # 25: meta init calls _from_config under an empty-weights context.
    from mindspeed_mm.fsdp.models.modelhub import ModelHub
    from mindspeed_mm.fsdp.params.argument import TrainingArguments

    importlib.import_module(PACKAGE)
    with pytest.raises(NotImplementedError, match="init_model_with_meta_device: false"):
        ModelHub.build(
            _model_args(tmp_path, synthetic_nuscenes), TrainingArguments(init_model_with_meta_device=True)
        )
