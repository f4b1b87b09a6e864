"""Training the tiny recipe through the SIMULATED host, stock entry and our custom entry.

Behaviours #7, #8, #17-#24, #26-#28 of the simulated host (numbered in its docstrings).
"""

import json
import math
import re

import pytest
import torch

from .harness import (
    host_config,
    host_environment,
    load_example,
    parse,
    record_batches,
    train_custom,
)

LOG_LINE = re.compile(
    r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration +(\d+)/ +(\d+) \| consumed samples: +(\d+) \| "
    r"elapsed time per iteration \(ms\): [\d.]+ \| learning rate: (\S+) \| global batch size: +1 \| "
    r"loss: (\S+) \|"
)


@pytest.fixture(scope="module")
def custom_run(synthetic_nuscenes, tmp_path_factory):
    """Three iterations of the tiny recipe through the custom entry (our Trainer subclass)."""
    tmp = tmp_path_factory.mktemp("custom_run")
    with host_environment():
        config = host_config(synthetic_nuscenes.root, synthetic_nuscenes.version, tmp / "save")
        config["training"]["streampetr"]["evaluate_at_end"] = True
        run = train_custom(config, tmp)
        torch.distributed.destroy_process_group()  # later tests start their own host
        yield run


def test_custom_entry_logs_the_hosts_line_with_every_loss_term(custom_run):
    # 21: rank-0 line, pre-step lr, generic loss_dict entries (our terms merged in).
    lines = custom_run.trainer.trainer.log_lines
    assert len(lines) == 3
    for iteration, line in enumerate(lines, start=1):
        match = LOG_LINE.match(line)
        assert match, line
        assert int(match.group(1)) == iteration and int(match.group(3)) == iteration
        terms = dict(re.findall(r" ([\w.]+): (\S+) \|", line.split("global batch size")[1]))
        assert {
            "loss_cls",
            "loss_bbox",
            "d0.loss_cls",
            "dn_loss_bbox",
            "enc_loss_iou",
            "centers2d_losses",
        } <= set(terms)
        total = sum(float(v) for k, v in terms.items() if "loss" in k and k != "loss")
        assert math.isclose(float(terms["loss"]), total, rel_tol=1e-5)


def test_custom_entry_evaluates_with_streampetrs_metric_after_training(custom_run):
    # 22: the host has no metric hook; the custom entry scores the val set outside its loop.
    metrics = custom_run.trainer.eval_metrics
    assert {"mAP", "NDS"} <= set(metrics) and 0.0 <= metrics["NDS"] <= 1.0
    assert (custom_run.save_dir / "eval").is_dir()
    assert custom_run.trainer.model.module.training  # back to training mode, streams reset


def test_a_host_checkpoint_evaluates_offline_to_the_same_metrics(custom_run, tmp_path, capsys):
    # 23: the stock entry's checkpoints are scored outside the host from the DCP files.
    with host_environment():
        from streampetr_plugin.integrations.mindspeed_mm.evaluate import main

        main(
            [
                str(custom_run.save_dir.parent / "host.yaml"),
                str(custom_run.save_dir),
                "--output",
                str(tmp_path),
                "--device",
                "cpu",
            ]
        )
    printed = json.loads(capsys.readouterr().out)
    expected = custom_run.trainer.eval_metrics
    assert printed["NDS"] == pytest.approx(expected["NDS"]) and printed["mAP"] == pytest.approx(
        expected["mAP"]
    )


def test_training_changed_the_weights_and_the_optimiser_used_the_recipe_multiplier(custom_run):
    # 7, 8: DDP prefixes names with "module."; the recipe's plan ".*img_backbone" still matches.
    trainer = custom_run.trainer
    names = [name for name, _ in trainer.model.named_parameters()]
    assert all(name.startswith("module.") for name in names)
    assert not any(re.match("img_backbone", name) for name in names)  # why the plan is not "^img_backbone"
    backbone = {id(p) for p in trainer.model.module.img_backbone.parameters()}
    base_lr = trainer.args.training.lr
    for group in trainer.optimizer.param_groups:
        in_backbone = {id(p) in backbone for p in group["params"]}
        assert len(in_backbone) == 1
        assert group["initial_lr"] == pytest.approx(base_lr * (0.1 if in_backbone.pop() else 1.0))
    final = trainer.model.module.state_dict()
    moved = [
        k for k, v in custom_run.initial.items() if v.is_floating_point() and not torch.equal(v, final[k])
    ]
    assert any(k.startswith("img_backbone.") for k in moved) and any(
        k.startswith("pts_bbox_head.") for k in moved
    )


def test_custom_entry_uses_the_recipes_exact_schedule(custom_run):
    # 20: the host's LambdaLR stepped per iteration; ours carries the recipe's factor.
    from streampetr_plugin.training.lr_schedule import CosineWarmup

    trainer = custom_run.trainer
    schedule = trainer.recipe.optimization.lr_scheduler.options()
    factor = CosineWarmup(max_iters=3, **schedule)
    group = trainer.optimizer.param_groups[-1]
    assert group["lr"] == pytest.approx(group["initial_lr"] * factor(3), rel=1e-12)
    logged = [float(LOG_LINE.match(line).group(4)) for line in trainer.trainer.log_lines]
    first = trainer.optimizer.param_groups[0]["initial_lr"]
    assert logged == pytest.approx([first * factor(i) for i in range(3)], rel=1e-6)


def test_host_checkpoint_is_the_reference_state_dict(custom_run, tmp_path):
    # 23, 24: DCP under iter_%07d, forced because optimiser/RNG are saved; model keys without "module.".
    from streampetr_plugin import build_model
    from streampetr_plugin.integrations.mindspeed_mm.checkpoint import (
        export_host_checkpoint,
        load_host_checkpoint,
    )
    from streampetr_plugin.interop.checkpoint import load_reference_checkpoint

    assert (custom_run.save_dir / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert (custom_run.save_dir / "iter_0000003" / "extra_state" / "extra_state_rank_0.pt").is_file()
    fresh = build_model(custom_run.trainer.recipe)
    state = load_host_checkpoint(custom_run.save_dir, fresh)
    trained = custom_run.trainer.model.module
    expected = fresh.state_dict()  # the reference layout: all six shared-branch slots
    assert set(state) == set(expected) and any(".cls_branches.1." in key for key in state)
    trained_params = dict(trained.named_parameters(remove_duplicate=False))
    trained_params.update(trained.named_buffers(remove_duplicate=False))
    assert all(torch.equal(state[k], trained_params[k]) for k in expected)
    report = load_reference_checkpoint(
        fresh, export_host_checkpoint(custom_run.save_dir, tmp_path / "w.pth", fresh)
    )
    assert report.is_exact


def test_stock_entry_trains_from_the_example_and_resumes_the_data_order(
    synthetic_nuscenes, tmp_path, custom_run
):
    # 12, 23, 26, 27: the stock Trainer, config only. Resuming restores the sampler position (our layout
    # continues with the next frame) but not the streaming memory: the continuity check resets it
    # although the frame is the direct successor the loader flags as continuing.
    with host_environment():
        from mindspeed_mm.fsdp.train.trainer import Trainer

        config = host_config(
            synthetic_nuscenes.root, synthetic_nuscenes.version, tmp_path / "save", train_iters=1
        )
        trainer = Trainer(parse(config, tmp_path / "a.yaml"))
        assert trainer.process_group_at_plugin_import is False
        first = record_batches(trainer.model)
        trainer.train()
        losses = [float(LOG_LINE.match(line).group(5)) for line in trainer.trainer.log_lines]
        assert len(losses) == 1 and math.isfinite(losses[0])
        torch.distributed.destroy_process_group()

        config["training"].update(load=str(tmp_path / "save"), train_iters=2)
        resumed = Trainer(parse(config, tmp_path / "b.yaml"))
        later = record_batches(resumed.model)
        head_prev_exists = []
        resumed.model.module.pts_bbox_head.register_forward_pre_hook(
            lambda _m, _a, kwargs: head_prev_exists.append(kwargs["prev_exists"].clone()), with_kwargs=True
        )
        resumed.train()
    assert len(first) == 1 and len(later) == 1
    for got, want in zip(first + later, custom_run.batches):
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(later[0]["scene_idx"], first[0]["scene_idx"])
    assert torch.equal(later[0]["frame_idx"], first[0]["frame_idx"] + 1)
    assert head_prev_exists[0].tolist() == [0.0]


def test_validation_in_sampler_mode_is_refused_so_the_examples_turn_it_off(synthetic_nuscenes, tmp_path):
    # 22: a val loader in sampler mode raises; evaluation happens outside the host loop.
    assert all(
        load_example(name)["training"]["val_interval"] == 0
        for name in ("streampetr_r50.yaml", "streampetr_vov.yaml")
    )
    with host_environment():
        from mindspeed_mm.fsdp.train.trainer import Trainer

        config = host_config(synthetic_nuscenes.root, synthetic_nuscenes.version, tmp_path / "save")
        config["training"]["val_interval"] = 1
        config["data"]["val_dataset_param"] = config["data"]["dataset_param"]
        with pytest.raises(ValueError, match="BaseRandomBatchSampler"):
            Trainer(parse(config, tmp_path / "v.yaml"))


def test_a_host_param_dtype_is_refused_with_one_clear_message(synthetic_nuscenes, tmp_path):
    # 7, 13: param_dtype casts the batch (and, under DDP, the parameters) to bf16.
    with host_environment():
        from mindspeed_mm.fsdp.train.trainer import Trainer

        from streampetr_plugin.integrations.mindspeed_mm.codec import HostCastError

        config = host_config(synthetic_nuscenes.root, synthetic_nuscenes.version, tmp_path / "save")
        config["parallel"]["fsdp_plan"]["param_dtype"] = "bf16"
        trainer = Trainer(parse(config, tmp_path / "d.yaml"))
        with pytest.raises(HostCastError, match="param_dtype: null"):
            trainer.train()


def test_fsdp2_plan_of_the_examples_matches_our_module_names(synthetic_nuscenes, tmp_path):
    # 7, 18, 28: apply_modules patterns must match real module paths (RuntimeError otherwise); the root
    # gains set_is_last_backward / set_requires_all_reduce because our model does not opt out.
    with host_environment():
        from mindspeed_mm.fsdp.distributed.parallel_state import init_parallel_state
        from mindspeed_mm.fsdp.distributed.parallelize import apply_parallel
        from mindspeed_mm.fsdp.models.modelhub import ModelHub
        from mindspeed_mm.fsdp.utils.utils import module_name_match

        config = host_config(synthetic_nuscenes.root, synthetic_nuscenes.version, tmp_path / "save")
        args = parse(config, tmp_path / "f.yaml")
        init_parallel_state(fully_shard_parallel_size=2, data_parallel_size=2)
        model = ModelHub.build(args.model, args.training)
        plan = args.parallel.fsdp_plan
        assert plan.apply_modules == load_example()["parallel"]["fsdp_plan"]["apply_modules"]
        wrapped = apply_parallel(model, plan, args.training)
        wrapped.set_is_last_backward(True)
        assert wrapped.fsdp_root_calls == [("set_is_last_backward", True)]
        assert module_name_match(
            "pts_bbox_head.transformer.decoder.layers.{*}", "pts_bbox_head.transformer.decoder.layers.1"
        )
        plan.apply_modules = ["backbone"]
        with pytest.raises(RuntimeError, match="No module named"):
            apply_parallel(ModelHub.build(args.model, args.training), plan, args.training)


def test_example_settings_reproduce_their_recipes(simulated_host):
    # 3, 8, 17, 20: every training.* value the translation derives from the recipe is in the example.
    from streampetr_plugin import load_recipe
    from streampetr_plugin.integrations.mindspeed_mm.settings import recipe_training_settings

    for name in ("streampetr_r50.yaml", "streampetr_vov.yaml"):
        example = load_example(name)
        recipe = load_recipe(example["model"]["streampetr"]["recipe"])
        expected = recipe_training_settings(recipe, world_size=8)
        for key, value in expected.items():
            assert example["training"][key] == (
                pytest.approx(value) if isinstance(value, float) else value
            ), key
        assert (
            int(expected["train_iters"] * example["training"]["lr_warmup_ratio"])
            == recipe.optimization.lr_scheduler.options()["warmup_iters"]
        )
        assert (
            example["data"]["dataset_param"]["streampetr"]["micro_batch_size"] == expected["micro_batch_size"]
        )
        assert (
            example["data"]["dataset_param"]["streampetr"]["recipe"]
            == example["model"]["streampetr"]["recipe"]
        )


def test_custom_entry_warns_about_settings_that_leave_the_recipe_and_refuses_mismatched_blocks(
    synthetic_nuscenes, tmp_path, caplog
):
    with host_environment():
        from streampetr_plugin.integrations.mindspeed_mm.train import trainer_class

        config = host_config(synthetic_nuscenes.root, synthetic_nuscenes.version, tmp_path / "save",
                             recipe_overrides=["optimization.ema.enabled=true"])
        config["training"]["lr"] = 1.0e-3
        config["data"]["dataset_param"]["streampetr"]["micro_batch_size"] = 2
        with caplog.at_level("WARNING"), pytest.raises(ValueError, match="micro_batch_size is 2"):
            trainer_class()(parse(config, tmp_path / "m.yaml"))
    messages = [record.getMessage() for record in caplog.records]
    assert any("training.lr is 0.001" in message for message in messages)
    # The host's trainer steps and saves the weights itself: a recipe's moving average is not kept there.
    assert any(message.startswith("optimization.ema is not applied") for message in messages)
