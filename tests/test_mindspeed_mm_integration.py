"""The MindSpeed-MM integration package: imports without the host, and equivalence with streampetr-run.

The host is the SIMULATION in ``tests/mindspeed_mm_host/sim`` (MindSpeed-MM is not installable here).
"""

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from data_fixtures import synthetic_nuscenes  # noqa: F401  (session fixture)
from mindspeed_mm_host.harness import (
    PACKAGE,
    SIM_ROOT,
    TINY_RECIPE,
    host_config,
    host_environment,
    purge_modules,
    train_custom,
)

REPO = Path(__file__).resolve().parent.parent


def test_without_mindspeed_mm_the_package_fails_with_one_line_naming_what_to_install():
    purge_modules()
    for _ in range(2):  # a second attempt under the same name fails the same way, nothing half-registered
        with pytest.raises(ImportError) as caught:
            importlib.import_module(PACKAGE)
        message = str(caught.value)
        assert "\n" not in message and "install MindSpeed-MM" in message and "mindspeed_mm" in message
        assert PACKAGE not in sys.modules


def _run_python(code: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SIM_ROOT), str(REPO)]),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_streampetr_plugin_never_imports_mindspeed_mm_and_the_host_walk_stays_light():
    # The simulated host is importable in the child, so only our own restraint keeps it out.
    seen = _run_python("""
        import json, sys
        import streampetr_plugin
        host = [m for m in sys.modules if m.split(".")[0] == "mindspeed_mm"]
        from mindspeed_mm.fsdp.utils.register import import_plugin
        before = set(sys.modules)
        import_plugin(["streampetr_plugin.integrations.mindspeed_mm"])
        heavy = sorted(m for m in set(sys.modules) - before if m.startswith(
            ("torch_npu", "PIL", "nuscenes", "streampetr_plugin.models", "streampetr_plugin.data.dataset",
             "mindspeed_mm.fsdp.train", "torch.distributed.checkpoint")))
        print(json.dumps({"host": host, "heavy": heavy}))
    """)
    assert seen == {"host": [], "heavy": []}


def _streampetr_run(recipe_path: Path, overrides, work_dir: Path):
    from streampetr_plugin import load_recipe
    from streampetr_plugin.host import create_plugin_host
    from streampetr_plugin.training.checkpointing import load_checkpoint
    from streampetr_plugin.training.metrics_log import read_metrics
    from streampetr_plugin.training.trainer import train

    host = create_plugin_host()
    recipe = load_recipe(recipe_path, [*overrides, f"runtime.work_dir={work_dir}", "runtime.resume=none"],
                         host)
    # The CPU adapter would pick its own thread count unless one is exported; the host run used this one.
    result = train(recipe, host=host, environ={"OMP_NUM_THREADS": str(torch.get_num_threads())})
    losses = [
        record["loss"] for record in read_metrics(work_dir / "metrics.jsonl") if record["kind"] == "train"
    ]
    return losses, load_checkpoint(result.last_checkpoint)["state_dict"]


@pytest.mark.parametrize(
    "micro_batch_size, recipe_overrides",
    [(1, ["optimization.grad_clip=null"]), (2, [])],
    ids=["one-stream-no-clipping", "two-streams-clipped"],
)
def test_simulated_host_and_streampetr_run_train_identically(
    synthetic_nuscenes,  # noqa: F811  (the session fixture imported above)
    tmp_path,
    micro_batch_size,
    recipe_overrides,
):
    """Same seed and data order: the same loss every iteration and the same weights after three.

    Without gradient clipping the two runs are bit-identical. With clipping, the host's norm (sum of
    squared per-tensor norms, then the root) and ``clip_grad_norm_``'s (norm of the norms) may differ
    in the last bit; parameters whose true gradient is zero (a bias before a GroupNorm, attention key
    biases) receive only rounding noise, which Adam normalises to steps of the order of the learning
    rate, so those few biases drift apart by a fraction of ``lr`` per step while everything else agrees.
    """
    iterations = 3
    with host_environment():
        config = host_config(
            synthetic_nuscenes.root,
            synthetic_nuscenes.version,
            tmp_path / "host",
            train_iters=iterations,
            micro_batch_size=micro_batch_size,
            recipe_overrides=recipe_overrides,
        )
        host = train_custom(config, tmp_path)
    overrides = config["model"]["streampetr"]["recipe_overrides"]
    losses, state = _streampetr_run(TINY_RECIPE, overrides, tmp_path / "run")
    trained = host.trainer.model.module.state_dict()
    assert len(host.losses) == len(losses) == iterations
    assert not all(torch.equal(value, host.initial[key]) for key, value in trained.items())
    if not recipe_overrides:
        assert host.losses == pytest.approx(losses, rel=1e-6)
        reach = iterations * config["training"]["lr"]  # the most Adam moves a parameter in that many steps
        assert all(torch.allclose(value, state[key], rtol=0, atol=reach) for key, value in trained.items())
        drifted = [key for key, value in trained.items() if not torch.allclose(value, state[key], atol=1e-5)]
        assert len(drifted) <= 0.1 * len(trained) and all(key.endswith("bias") for key in drifted), drifted
        return
    assert host.losses == losses
    assert all(torch.equal(value, state[key]) for key, value in trained.items())
