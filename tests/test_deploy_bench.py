"""``streampetr bench --inference --backend onnxruntime`` and ``--backend torch-cpu-levers``: what they
time and when they refuse (the model: ``tests/deploy_helpers.py``; no timing is asserted)."""
from __future__ import annotations

import json

import pytest

from streampetr_plugin.adapters.capture import cpp_compiler
from streampetr_plugin.bench.command import bench_command
from streampetr_plugin.bench.report import backend_lines
from streampetr_plugin.cli.bench import main as bench_main
from streampetr_plugin.deploy.bench import CPU_LEVERS, time_backends
from streampetr_plugin.deploy.export import load_detector
from streampetr_plugin.host import create_plugin_host
from streampetr_plugin.training.precision import cpu_has_native_bf16
from tests import deploy_helpers


HOST = create_plugin_host()


def test_every_configuration_times_every_frame_and_the_table_lists_them(synthetic_nuscenes, tmp_path_factory):
    exported = deploy_helpers.exported_demo(synthetic_nuscenes, tmp_path_factory)
    detector = load_detector(exported.recipe, HOST, exported.checkpoint)
    comparison = time_backends(
        exported.recipe, detector, exported.out_dir, steps=3, warmup=1, levels=("basic", "all")
    )
    names = [timing.name for timing in comparison.timings]
    assert names == ["torch eager", "onnxruntime basic", "onnxruntime all"]
    assert all(len(timing.step_time_s.times) == 3 for timing in comparison.timings)
    lines = backend_lines(comparison.to_dict())
    assert all(any(line.startswith(name) for line in lines) for name in names)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch-cpu-levers"])
@pytest.mark.parametrize("options", [{}, {"inference": True, "variants": ["amp"]}])
def test_the_inference_comparisons_need_inference_alone(backend, options):
    with pytest.raises(ValueError, match=f"--backend {backend}"):
        bench_command("demo_cpu", backend=backend, **options)


def test_cpu_levers_time_every_frame_of_the_model_as_built_and_of_each_lever(capsys):
    bench_main(["demo_cpu", "--inference", "--backend", "torch-cpu-levers", "--steps", "2", "--warmup", "1",
                "--json"])
    timings = json.loads(capsys.readouterr().out)["backends"]["timings"]
    compiler_found = cpp_compiler()[0] is not None  # the inductor configurations need one
    runnable = [lever for lever in CPU_LEVERS
                if (compiler_found or not lever.capture) and (cpu_has_native_bf16() or not lever.bf16)]
    levers = [lever.name for lever in runnable]
    assert [timing["name"] for timing in timings] == ["torch as built", *levers]
    assert all(len(timing["step_time_s"]["times"]) == 2 for timing in timings)
    lines = backend_lines({"threads": 1, "export_s": None, "timings": timings})
    assert any(line.startswith("torch BN folded + channels-last ") for line in lines)
