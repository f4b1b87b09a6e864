"""``streampetr bench``: the command on a tiny recipe (CPU), its synthetic batches, and its instruments."""
import argparse
import contextlib
import io
import json
import logging
import math
import mmap

import numpy as np
import pytest
import torch

from data_fixtures import synthetic_nuscenes  # noqa: F401  (session fixture)
from streampetr_plugin.adapters.device import DeviceHandle
from streampetr_plugin.bench import VARIANT_GROUPS
from streampetr_plugin.bench.command import bench_command
from streampetr_plugin.cli.bench import add_bench_arguments
from streampetr_plugin.cli.bench import main as bench_main
from streampetr_plugin.bench.measure import count_flops, counting_setup, reset_peak_memory, time_steps
from streampetr_plugin.bench.report import StepTimes
from streampetr_plugin.bench.synthetic_batch import StreamShape, SyntheticStreams, box_corners, stream_shape
from streampetr_plugin.bench.train_step import BenchRun
from streampetr_plugin.bench.variants import Variant, expand_groups
from streampetr_plugin import load_recipe
from streampetr_plugin.host import create_plugin_host
from streampetr_plugin.data.batch import CAMERA_KEYS, IMAGE_KEYS, META_KEYS, POSE_KEYS, TARGET_KEYS
from streampetr_plugin.models.layers.multihead_attention import MultiheadAttentionCore
from streampetr_plugin.training.precision import cpu_has_native_bf16
from tests.tiny_demo import TINY_MODEL

# The CPU demo recipe shrunk further (64 x 160 images, 32 channels, 16 queries), with activation
# checkpointing switched on so that the checkpointing variant has something to switch; one CPU thread.
RECIPE = "demo_cpu"
TINY = [
    "model.backbone.with_cp=true",
    "model.head.with_cp=true",
    *TINY_MODEL,
    "data.train.final_dim=[64,160]",
    "data.val.final_dim=[64,160]",
    "accelerator.adapters.cpu_threads.num_threads=1",
]
STEPS = 3


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    """The bench runs the cpu_threads adapter (torch.set_num_threads); leave the process as found."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def report():
    """One bench run shared by the tests below: (the returned dict, what it printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        returned = bench_command(
            RECIPE, TINY, steps=STEPS, warmup=1, inference=True, as_json=True, device="cpu",
            variants=["attention", "amp", "fused_optimizer"],
        )
    return returned, printed.getvalue()


BACKENDS = create_plugin_host().registries.attention_backends


def test_bench_prints_the_json_it_returns(report):
    returned, printed = report
    assert json.loads(printed) == json.loads(json.dumps(returned))
    assert returned["mode"] == "model" and returned["device"]["kind"] == "cpu"
    assert returned["image_hw"] == [64, 160] and returned["num_cameras"] == 6
    assert returned["seed_reference"]["seconds_per_step"] == 0.615


def test_training_figures_are_sane_and_consistent(report):
    train = report[0]["baseline"]["train"]
    times = train["step_time_s"]
    assert len(times["times"]) == STEPS and all(t > 0 for t in times["times"])
    assert times["min"] <= times["median"] <= times["p90"] <= times["max"]
    assert times["median"] == pytest.approx(float(np.median(times["times"])))
    assert train["batch_size"] == 2  # data.batch_size_per_device of the recipe
    assert train["samples_per_s"] == pytest.approx(2 / times["median"])
    assert train["flops_per_sample"] > 0
    assert train["tflops_per_s"] == pytest.approx(train["flops_per_sample"] * 2 / times["median"] / 1e12)
    assert train["peak_memory_mib"] > 0 and "RSS" in train["peak_memory_kind"]
    assert train["nonfinite_steps"] == 0
    assert train["cpu_s_per_step"] > 0  # process CPU time of a step, robust to other processes


def test_baseline_reports_host_syncs_ops_and_where_the_syncs_come_from(report):
    returned = report[0]
    train, infer = returned["baseline"]["train"], returned["baseline"]["inference"]
    assert 1 <= train["host_syncs_per_step"] <= 4  # at least the loss read back; the recipe's target
    assert sum(train["host_sync_sites"].values()) == train["host_syncs_per_step"]
    assert train["blocking_uploads_per_step"] == 0 and train["blocking_upload_sites"] == {}
    assert infer["host_syncs_per_step"] >= 1  # the detections are copied to the host
    # Training runs forward, backward and the optimiser: many more ops than an inference frame.
    assert train["ops_per_step"] > 2 * infer["ops_per_step"] > 0
    assert train["kernel_launches_per_step"] is None  # counted on CUDA only
    variant = next(v for v in returned["variants"] if v["status"] == "measured")
    assert variant["result"]["train"]["host_syncs_per_step"] is None  # counted on the baseline only


def test_inference_is_timed_at_the_eval_batch_size_with_fewer_flops(report):
    baseline = report[0]["baseline"]
    infer = baseline["inference"]
    assert infer["batch_size"] == 1
    assert len(infer["step_time_s"]["times"]) == STEPS
    assert infer["samples_per_s"] == pytest.approx(1 / infer["step_time_s"]["median"])
    # No backward, no 2D head at inference: clearly fewer FLOPs than a training frame.
    assert 0 < infer["flops_per_sample"] < baseline["train"]["flops_per_sample"] / 2


def test_variants_are_measured_skipped_or_the_baseline_with_reasons(report):
    returned = report[0]
    outcomes = {(v["group"], v["option"]): v for v in returned["variants"]}
    assert returned["baseline"]["settings"]["attention"] == "sdpa"
    assert outcomes[("attention", "sdpa")]["status"] == "baseline"
    math_run = outcomes[("attention", "math")]
    assert math_run["status"] == "measured" and math_run["result"]["settings"]["attention"] == "math"
    baseline_median = returned["baseline"]["train"]["step_time_s"]["median"]
    math_median = math_run["result"]["train"]["step_time_s"]["median"]
    assert math_run["speedup"] == pytest.approx(baseline_median / math_median)
    assert math_run["result"]["inference"] is not None  # the backend matters at inference too
    assert outcomes[("attention", "npu_fusion_attention")]["status"] == "skipped"
    assert outcomes[("amp", "fp32")]["status"] == "baseline"
    fp16 = outcomes[("amp", "fp16")]
    assert fp16["status"] == "skipped" and "optimization.amp.cpu" in fp16["reason"]
    bf16 = outcomes[("amp", "bf16")]
    if cpu_has_native_bf16():
        assert bf16["status"] == "measured" and bf16["result"]["settings"]["amp"] == "bf16"
        assert bf16["result"]["inference"] is not None  # precision matters at inference too
    else:
        assert bf16["status"] == "skipped" and "native bf16" in bf16["reason"]
    # On the CPU the trainer's adapter picks foreach AdamW; the fused variant really runs fused.
    assert returned["baseline"]["settings"]["fused_optimizer"] == "off"
    fused = outcomes[("fused_optimizer", "on")]
    assert fused["status"] == "measured" and "fused" in fused["result"]["settings"]["optimizer"]
    assert fused["result"]["inference"] is None  # the optimiser does not change inference
    # amp has two runnable options where the CPU has native bf16, else one (no winner).
    expected_groups = {"attention", "fused_optimizer"} | ({"amp"} if cpu_has_native_bf16() else set())
    assert set(returned["winners"]) == expected_groups
    assert returned["winners"]["attention"] in ("sdpa", "math")


def test_table_output_names_device_baseline_and_winners(capsys):
    bench_command(RECIPE, TINY, steps=1, warmup=0, device="cpu", variants=["checkpointing"])
    text = capsys.readouterr().out
    assert "AMD" in text or "cpu" in text.lower()
    assert "baseline" in text and "checkpointing=off" in text
    assert "fastest on this device: checkpointing" in text
    assert "per training step: " in text and " host syncs, " in text
    assert "0.615 s/step" in text


def test_precision_check_compares_autocast_with_fp32_on_the_same_frame():
    returned = bench_command(RECIPE, TINY, device="cpu", precision=["bf16", "fp16"], as_json=True)
    assert returned["mode"] == "precision" and returned["baseline"] is None
    bf16, fp16 = returned["precision"]
    assert (bf16["dtype"], fp16["dtype"]) == ("bf16", "fp16")
    for entry in (bf16, fp16):
        assert entry["grad_cosine_per_module"].keys() == {"img_backbone", "img_neck", "img_roi_head", "pts_bbox_head"}
        assert all(-1.0 <= cosine <= 1.0 for cosine in entry["grad_cosine_per_module"].values())
        assert 0.9 < entry["grad_cosine"] < 1.0  # moved by rounding, not by other random draws
        assert 0 < entry["total_loss_rel"] < 1e-2
        # The losses are non-negative, so the total moves relatively no more than its most moved term.
        assert "loss" in entry["worst_loss_term"] and entry["worst_loss_term_rel"] >= entry["total_loss_rel"]
    # bf16 keeps 8 significant bits, fp16 11: bf16 moves the features more, and both move them.
    assert 0 < fp16["feature_rel_l2"] < bf16["feature_rel_l2"] < 0.05
    with pytest.raises(ValueError, match="--precision"):
        bench_command(RECIPE, TINY, device="cpu", precision=["bf16"], inference=True)


def test_precision_check_command_line_prints_one_line_per_dtype(capsys):
    assert bench_main([RECIPE, *TINY, "--device", "cpu", "--precision", "bf16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"streampetr bench {RECIPE} (precision) on ")
    bf16 = [line for line in lines if line.startswith("bf16: neck features ")]
    assert len(bf16) == 1 and "gradient cosine 0." in bf16[0] and "img_backbone" in bf16[0]


def test_options_that_do_not_go_together_end_in_one_line_and_exit_2(capsys):
    assert bench_main([RECIPE, "--precision", "bf16", "--inference"]) == 2
    assert bench_main([RECIPE, "--data", "--inference"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --precision compares one training frame's numerics: use it without other modes",
        "error: --data times the input pipeline only; run --inference / --variants without --data",
    ]


def test_graph_capture_variant_runs_the_adapter_against_eager():
    # aot_eager: the same Dynamo graphs without code generation (no compiler, no minutes of compiling).
    capture = ["accelerator.adapters.graph_capture.backend=aot_eager", "accelerator.adapters.graph_capture.enabled=false"]
    returned = bench_command(RECIPE, [*TINY, *capture], steps=1, warmup=1, device="cpu", variants=["graph_capture"],
                             as_json=True)
    assert returned["baseline"]["settings"]["graph_capture"] == "off"
    outcomes = {v["option"]: v for v in returned["variants"]}
    assert outcomes["off"]["status"] == "baseline"
    captured = outcomes["on"]
    assert captured["status"] == "measured" and captured["result"]["settings"]["graph_capture"] == "on"
    assert captured["result"]["inference"] is None  # the bench ran no inference here


# ------------------------------------------------------------------------------------- synthetic data


def test_synthetic_batch_follows_the_batch_contract_and_the_recipe_shapes():
    recipe = load_recipe("r50_8p")
    shape = stream_shape(recipe)
    assert (shape.batch_size, shape.image_hw, shape.num_classes) == (2, (256, 704), 10)
    streams = SyntheticStreams(shape, boxes_per_frame=20)
    first, second = streams.frame(0), streams.frame(1)
    for key in IMAGE_KEYS + CAMERA_KEYS + POSE_KEYS + META_KEYS + TARGET_KEYS:
        assert key in first
    assert first["img"].shape == (2, 6, 3, 256, 704)
    assert first["lidar2img"].shape == (2, 6, 4, 4)
    assert first["timestamp"].dtype == torch.float64
    assert second["timestamp"][0] - first["timestamp"][0] == pytest.approx(0.5)
    assert first["prev_exists"].tolist() == [0.0, 0.0] and second["prev_exists"].tolist() == [1.0, 1.0]
    identity = torch.eye(4).expand(2, 4, 4)
    assert torch.allclose(second["ego_pose"] @ second["ego_pose_inv"], identity, atol=1e-4)
    assert torch.allclose(first["lidar2img"], first["intrinsics"] @ first["extrinsics"])
    assert first["scene_token"] == second["scene_token"]  # rows continue their streams


def test_synthetic_targets_lie_in_the_range_and_project_into_their_2d_boxes():
    shape = StreamShape(batch_size=1, image_hw=(320, 800), pc_range=(-51.2, -51.2, -5.0, 51.2, 51.2, 3.0),
                        num_classes=10)
    frame = SyntheticStreams(shape, boxes_per_frame=40, seed=3).frame(0)
    boxes = frame["gt_bboxes_3d"][0]
    assert boxes.shape == (40, 9)
    assert (boxes[:, :2].abs() < 51.2).all() and (boxes[:, 2] > -5).all() and (boxes[:, 2] < 3).all()
    visible = 0
    for cam in range(6):
        lidar2img = frame["lidar2img"][0, cam]
        boxes_2d, centres = frame["gt_bboxes_2d"][0][cam], frame["centers_2d"][0][cam]
        depths = frame["depths"][0][cam]
        visible += len(boxes_2d)
        assert len(frame["gt_labels_2d"][0][cam]) == len(boxes_2d) == len(centres) == len(depths)
        assert (boxes_2d[:, 0] <= boxes_2d[:, 2]).all() and (boxes_2d[:, 1] <= boxes_2d[:, 3]).all()
        assert (boxes_2d[:, 2] < 800).all() and (boxes_2d[:, 3] < 320).all()
        # The centre of a box fully in front of the camera projects inside the hull of its corners.
        assert (centres >= boxes_2d[:, :2] - 1e-3).all() and (centres <= boxes_2d[:, 2:] + 1e-3).all()
        assert (depths > 0).all()
        # Independently: every 2D centre and depth is the projection of one of the 3D box centres.
        projected = torch.cat([boxes[:, :3], torch.ones(len(boxes), 1)], dim=1) @ lidar2img.T  # (n, 4)
        for centre, depth in zip(centres, depths):
            nearest = (projected[:, 2] - depth).abs().argmin()
            assert projected[nearest, 2] == pytest.approx(float(depth), abs=1e-4)
            assert torch.allclose(projected[nearest, :2] / projected[nearest, 2], centre, atol=1e-3)
    assert visible >= 10  # most boxes are seen by some camera


def test_box_corners_of_an_axis_aligned_and_a_turned_box():
    box = torch.tensor([[1.0, 2.0, 0.0, 4.0, 2.0, 1.0, 0.0]])
    corners = box_corners(box)[0]
    assert torch.allclose(corners.amin(0), torch.tensor([-1.0, 1.0, -0.5]))
    assert torch.allclose(corners.amax(0), torch.tensor([3.0, 3.0, 0.5]))
    turned = box_corners(torch.tensor([[0.0, 0.0, 0.0, 4.0, 2.0, 1.0, math.pi / 2]]))[0]
    assert torch.allclose(turned.amax(0), torch.tensor([1.0, 2.0, 0.5]), atol=1e-6)  # length now along y


# ---------------------------------------------------------------------------------------- instruments


def test_step_time_summary_median_and_p90():
    summary = StepTimes.from_times([4.0, 1.0, 10.0, 2.0, 3.0])
    assert summary.median == 3.0
    assert summary.p90 == pytest.approx(4.0 + 0.6 * (10.0 - 4.0))  # linear interpolation at rank 3.6
    assert (summary.min, summary.max, summary.mean) == (1.0, 10.0, 4.0)
    with pytest.raises(ValueError):
        StepTimes.from_times([])


def test_long_steps_are_reported_while_they_run(caplog):
    calls = []
    with caplog.at_level(logging.INFO, logger="streampetr_plugin.bench.measure"):
        times, _ = time_steps(calls.append, lambda index: index, steps=3, warmup=2,
                              device=DeviceHandle("cpu"), label="bench demo, training")
    assert calls == [0, 1, 2, 3, 4] and len(times) == 3
    lines = [record.getMessage() for record in caplog.records]
    # steps this short: the first one and the last one (at most one line every 10 s in between)
    assert len(lines) == 2
    assert lines[0].startswith("bench demo, training: warm-up 1/2 ")
    assert lines[1].startswith("bench demo, training: step 3/3 ") and lines[1].endswith(" s")


def test_flop_count_of_a_linear_layer_forward_and_backward():
    layer = torch.nn.Linear(8, 16)
    inputs = torch.randn(5, 8, requires_grad=True)
    flops = count_flops(lambda: layer(inputs).sum().backward())
    # forward 2*5*8*16; backward: grad of the input and of the weight, each as much again.
    assert flops == 3 * 2 * 5 * 8 * 16


def test_counting_setup_counts_attention_through_math_and_restores_the_model():
    batch, queries, keys, embed = 2, 6, 10, 16
    attention = MultiheadAttentionCore(embed_dims=embed, num_heads=4, backend="sdpa")
    attention.with_cp = True  # stands for a checkpointed layer
    query, key = torch.randn(batch, queries, embed), torch.randn(batch, keys, embed)
    with torch.no_grad(), counting_setup(attention):
        assert attention.backend == "math" and attention.with_cp is False
        flops = count_flops(lambda: attention(query, key, key))
    assert attention.backend == "sdpa" and attention.with_cp is True
    projections = 2 * batch * embed * embed * (queries + 2 * keys) + 2 * batch * queries * embed * embed
    scores_and_values = 2 * (2 * batch * queries * keys * embed)
    assert flops == projections + scores_and_values


def test_cpu_peak_memory_window_resets():
    cpu = DeviceHandle("cpu")
    if not reset_peak_memory(cpu):
        pytest.skip("/proc/self/clear_refs is not writable here")
    # An anonymous mapping of its own, so the block leaves the process when closed whatever malloc's
    # settings (the default-on cpu_glibc_malloc adapter, applied by earlier in-process runs, keeps freed
    # heap memory in the process on purpose).
    block = mmap.mmap(-1, 300 * 2**20)
    block.write(b"\1" * len(block))  # 300 MiB touched
    high = cpu.peak_memory_mib()
    block.close()
    assert reset_peak_memory(cpu)
    assert cpu.peak_memory_mib() < high - 200


# ------------------------------------------------------------------------------------ set-up and CLI


def test_bench_run_steps_like_the_trainer_and_reports_its_settings():
    recipe = load_recipe(RECIPE, TINY)
    run = BenchRun(recipe, DeviceHandle("cpu"), create_plugin_host())
    settings = run.settings()
    assert settings["checkpointing"] == "on"  # the recipe's with_cp on backbone and decoder
    assert settings["amp"] == "fp32" and settings["fused_optimizer"] == "off"
    assert "foreach" in settings["optimizer"]  # the cpu_foreach_adamw adapter ran
    streams = SyntheticStreams(stream_shape(recipe), seed=1)
    before = [p.detach().clone() for p in run.model.parameters() if p.requires_grad]
    losses = [run.train_step(streams.frame(i)) for i in range(2)]
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)
    after = [p for p in run.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    run.release_training_state()
    assert run.optimizer is None and all(p.grad is None for p in run.model.parameters())


def test_variant_rules():
    cpu = DeviceHandle("cpu")
    recipe = load_recipe("vov_8p")
    baseline = {"attention": "sdpa", "checkpointing": "on", "amp": "fp32", "channels_last": "off",
                "fused_optimizer": "off"}
    assert "fp32 or bf16" in Variant("amp", "fp16").unavailable_reason(cpu, recipe, baseline, BACKENDS)
    bf16_reason = Variant("amp", "bf16").unavailable_reason(cpu, recipe, baseline, BACKENDS)
    assert (bf16_reason is None) == cpu_has_native_bf16()
    npu_attention = Variant("attention", "npu_fusion_attention")
    assert "torch_npu" in npu_attention.unavailable_reason(cpu, recipe, baseline, BACKENDS)
    assert Variant("channels_last", "on").unavailable_reason(cpu, recipe, baseline, BACKENDS) is None
    assert "img_backbone" in Variant("channels_last", "on").unavailable_reason(
        cpu, recipe, {**baseline, "channels_last": "n/a"}, BACKENDS
    )
    assert Variant("amp", "bf16").recipe_overrides("cuda") == [
        "optimization.amp.enabled=true", "optimization.amp.dtype=bf16"
    ]
    assert Variant("amp", "bf16").recipe_overrides("cpu") == [
        "optimization.amp.enabled=true", "optimization.amp.cpu=bf16"
    ]
    fused = Variant("fused_optimizer", "on")
    assert fused.recipe_overrides("cuda") == ["optimization.optimizer.implementation=fused"]
    assert fused.recipe_overrides("npu") == ["optimization.optimizer.implementation=auto"]  # the adapter's
    assert Variant("checkpointing", "off").model_settings().checkpointing is False
    assert expand_groups(("all",)) == VARIANT_GROUPS
    assert expand_groups(("amp", "attention")) == ("attention", "amp")
    with pytest.raises(ValueError, match="unknown variant"):
        expand_groups(("speed",))


def test_cli_arguments_and_argument_checks():
    parser = add_bench_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["vov_8p", "data.num_workers=1", "--steps", "4", "--json", "--variants", "all"])
    assert (args.recipe, args.overrides, args.steps, args.warmup) == ("vov_8p", ["data.num_workers=1"], 4, 2)
    assert args.as_json and args.variants == ["all"] and args.device is None and not args.data
    assert callable(args.run)
    with pytest.raises(SystemExit):
        parser.parse_args(["vov_8p", "--variants", "speed"])
    with pytest.raises(ValueError, match="steps"):
        bench_command("vov_8p", steps=0)
    with pytest.raises(ValueError, match="--data"):
        bench_command("vov_8p", data=True, variants=["amp"])


# ---------------------------------------------------------------------------------------- --data mode


def test_data_mode_times_the_input_pipeline(synthetic_nuscenes, capsys):  # noqa: F811
    overrides = [
        "~data.train.synthetic",  # use the session's synthetic dataset instead of generating one
        f"data.train.root={synthetic_nuscenes.root}",
        f"data.train.version={synthetic_nuscenes.version}",
        "data.train.final_dim=[64,160]",
        "data.train.resize_lim=[0.9,1.1]",
        "data.num_workers=1",
    ]
    returned = bench_command(RECIPE, overrides, steps=4, warmup=1, data=True, as_json=True, device="cpu")
    assert json.loads(capsys.readouterr().out)["mode"] == "data"
    data = returned["data"]
    assert data["batch_size"] == 2 and data["num_workers"] == 1 and data["num_samples"] > 0
    single = data["single_process"]
    assert len(single["step_time_s"]["times"]) == 4 and all(t > 0 for t in single["step_time_s"]["times"])
    assert single["samples_per_s"] == pytest.approx(2 * 4 / sum(single["step_time_s"]["times"]))
    loader = data["with_workers"]
    assert loader["samples_per_s"] > 0
    assert data["samples_per_s_per_worker"] == pytest.approx(loader["samples_per_s"] / 1)
    assert data["max_steps_per_s"] == pytest.approx(loader["samples_per_s"] / 2)
    assert returned["baseline"] is None
