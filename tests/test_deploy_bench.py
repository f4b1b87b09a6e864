"""``streampetr bench --inference --backend onnxruntime``: what it times and when it refuses (the model:
``tests/deploy_helpers.py``; no timing is asserted)."""
from __future__ import annotations

import pytest

from streampetr_plugin.bench.command import bench_command
from streampetr_plugin.bench.report import backend_lines
from streampetr_plugin.deploy.bench import time_backends
from streampetr_plugin.deploy.export import load_detector
from streampetr_plugin.host import create_plugin_host
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


@pytest.mark.parametrize("options", [{}, {"inference": True, "variants": ["amp"]}])
def test_the_onnxruntime_backend_needs_inference_alone(options):
    with pytest.raises(ValueError, match="--backend onnxruntime"):
        bench_command("demo_cpu", backend="onnxruntime", **options)
