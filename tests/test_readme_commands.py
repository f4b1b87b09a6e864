"""Every command of the README's "Using it" table, and the quick start's, run through its real entry point.

The table is read from README.md: each command in it must have a runner below (a command without one
fails), and each runner drives ``streampetr`` / ``streampetr-run`` (in process, ``main([...])``) or the
torchrun module entry point (a subprocess) on the tests' tiny synthetic nuScenes, with the demo recipe
shrunk to seconds (``tests/tiny_demo.py``). Recipes too large for a CPU test (``vov_8p``) are resolved,
validated and built through the same command instead of trained.
"""
from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import sys
from functools import cached_property
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch
import yaml

from data_fixtures import SyntheticNuScenes, synthetic_nuscenes  # noqa: F401  (session fixture)
from streampetr_plugin.cli.main import main as streampetr
from streampetr_plugin.cli.run import main as streampetr_run
from streampetr_plugin import load_recipe
from streampetr_plugin.config.loader import shipped_recipes
from streampetr_plugin.data.infos import load_infos
from streampetr_plugin.evaluation.predictions import list_predictions, load_predictions
from tests.tiny_demo import tiny_demo_overrides
from tests.trainer_helpers import REPO_ROOT, subprocess_env

README = REPO_ROOT / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    assert f"\n## {title}\n" in text, f"README.md has no section {title!r}"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_commands() -> List[str]:
    """The commands (in backticks) of the second column of the "Using it" table, in order."""
    rows = [line for line in _section("Using it").splitlines() if line.startswith("|")]
    commands = []
    for row in rows[2:]:  # the header and the |---| line first
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        found = re.findall(r"`([^`]+)`", cells[-1])
        assert found, f"README table row without a command: {row}"
        commands += found
    return commands


def quick_start_commands() -> List[str]:
    """The ``streampetr`` / ``streampetr-run`` commands of the quick start's shell blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", _section("Quick start"), flags=re.S)
    parts = [part.strip() for block in blocks for line in block.splitlines() for part in line.split("&&")]
    return [part for part in parts if part.split(" ", 1)[0] in ("streampetr", "streampetr-run")]


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class Workspace:
    """What the commands share: the tiny data, one trained run (made on first use), a scratch directory."""

    def __init__(self, data: SyntheticNuScenes, scratch: Path) -> None:
        self.data = data
        self.scratch = scratch
        self.summary: List[str] = []

    def overrides(self, work_dir: Path, max_iters: int = 2) -> List[str]:
        return tiny_demo_overrides(self.data.root, self.data.version, work_dir, max_iters)

    @cached_property
    def run_dir(self) -> Path:
        """A 2-iteration run of the tiny demo through ``streampetr-run``, evaluated at its end."""
        run_dir = self.scratch / "run"
        handler = _Messages()
        logger = logging.getLogger("streampetr.run")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            assert streampetr_run(["demo_cpu", *self.overrides(run_dir)]) == 0
        finally:
            logger.removeHandler(handler)
            logger.setLevel(logging.NOTSET)
        self.summary = [message for message in handler.messages if message.startswith("finished ")]
        return run_dir

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "iter_00000002.pth"

    @cached_property
    def exported(self) -> Path:
        """The run's checkpoint as an ONNX graph (``streampetr export``, no parity frames)."""
        out_dir = self.scratch / "exported"
        argv = ["export", "demo_cpu", *self.overrides(self.run_dir), "--checkpoint", str(self.checkpoint),
                "--out", str(out_dir), "--parity-frames", "0"]
        assert streampetr(argv) == 0
        return out_dir


@pytest.fixture(autouse=True)
def in_a_clone(monkeypatch):
    """README paths (recipes/vov_8p.yaml) are relative to the repository root, where a user runs them."""
    monkeypatch.chdir(REPO_ROOT)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, synthetic_nuscenes):  # noqa: F811
    threads = torch.get_num_threads()  # the recipe's cpu_threads adapter sets the process's thread count
    yield Workspace(synthetic_nuscenes, tmp_path_factory.mktemp("readme"))
    torch.set_num_threads(threads)


def words(command: str) -> List[str]:
    """A README command as arguments, without the program name and the optional ``[...]`` parts."""
    return shlex.split(re.sub(r"\s*\[[^\]]*\]", "", command))[1:]


# ---------------------------------------------------------------------------------------------- runners


def train_one_process(command: str, ws: Workspace, capsys) -> None:
    recipe = words(command)[0]
    assert streampetr_run([recipe, "--build-only"]) == 0  # the README's recipe, as written, builds
    run_dir = ws.run_dir
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()
    assert ws.checkpoint.is_file()
    (summary,) = ws.summary  # the run ends saying where everything is
    evaluation = run_dir / "eval" / "iter_00000002"
    for label, path in (("run dir", run_dir), ("metrics", run_dir / "metrics.jsonl"),
                        ("last checkpoint", ws.checkpoint), ("evaluation", evaluation),
                        ("picture", evaluation / "sample_")):
        assert re.search(rf"\n\s+{label}:\s+{re.escape(str(path))}", summary), (label, summary)


def train_under_torchrun(command: str, ws: Workspace, capsys) -> None:
    # torchrun starts `python -m streampetr_plugin.cli.run RECIPE` once per device with these variables.
    assert words(command)[:3] == ["--nproc-per-node", "8", "-m"]
    module, recipe = words(command)[3:5]
    assert streampetr(["validate", recipe]) == 0
    work_dir = ws.scratch / "torchrun"
    env = {**subprocess_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    overrides = [*ws.overrides(work_dir, max_iters=1), "runtime.evaluate_at_end=false"]
    done = subprocess.run([sys.executable, "-m", module, "demo_cpu", *overrides], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work_dir / "checkpoints" / "iter_00000001.pth").is_file()


def validate(command: str, ws: Workspace, capsys) -> None:
    assert words(command) == ["validate", "RECIPE"]
    assert streampetr(["validate", "demo_cpu", *ws.overrides(ws.scratch / "validate")]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK (demo_cpu)")


def show(command: str, ws: Workspace, capsys) -> None:
    assert words(command) == ["show", "RECIPE"]
    assert streampetr(["show", "demo_cpu", "runtime.max_iters=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["name"] == "demo_cpu" and shown["runtime"]["max_iters"] == 7


def copy_recipe(command: str, ws: Workspace, capsys) -> None:
    name, dest = words(command)[1:]
    target = ws.scratch / dest
    assert streampetr(["cp", name, str(target)]) == 0
    assert load_recipe(target).name == Path(dest).stem
    assert load_recipe(target).model.backbone == load_recipe(name).model.backbone


def list_recipes(command: str, ws: Workspace, capsys) -> None:
    assert streampetr(words(command)) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == shipped_recipes()


def print_schema(command: str, ws: Workspace, capsys) -> None:
    assert streampetr(words(command)) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "runtime" in schema["properties"] and "vovnet" in schema["x-components"]["backbones"]


def list_plugins(command: str, ws: Workspace, capsys) -> None:
    assert re.findall(r"\[(--\w+)\]", command) == ["--all", "--json"]
    assert streampetr(["plugins", "--all"]) == 0
    assert "streampetr-builtin" in capsys.readouterr().out
    assert streampetr(["plugins", "--json"]) == 0
    assert "streampetr-builtin" in {p["name"] for p in json.loads(capsys.readouterr().out)["plugins"]}


def create_data(command: str, ws: Workspace, capsys) -> None:
    assert words(command)[:2] == ["create-data", "--root"] and words(command)[3] == "--version"
    out_dir = ws.scratch / "infos"
    assert streampetr(["create-data", "--root", str(ws.data.root), "--version", ws.data.version,
                       "--out-dir", str(out_dir)]) == 0
    written = load_infos(out_dir / "streampetr_infos_val.json")
    assert [s.token for s in written.samples] == [s.token for s in load_infos(ws.data.val_info).samples]


def make_synthetic(command: str, ws: Workspace, capsys) -> None:
    assert words(command) == ["make-synthetic", "DIR"] and "--scenes N --seed S" in command
    root = ws.scratch / "synthetic"
    assert streampetr(["make-synthetic", str(root), "--scenes", "2", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(root)
    assert (root / "v1.0-mini" / "scene.json").is_file()


def evaluate(command: str, ws: Workspace, capsys) -> None:
    assert words(command) == ["eval", "RECIPE", "--checkpoint", "PATH"]
    assert "[--tasks detection tracking]" in command
    own_evaluation = sorted(p.name for p in (ws.run_dir / "eval").iterdir())
    before = {path: path.stat().st_mtime_ns for path in (ws.run_dir / "eval").rglob("*")}
    argv = ["eval", "demo_cpu", *ws.overrides(ws.run_dir), "--checkpoint", str(ws.checkpoint)]
    assert streampetr(argv) == 0
    out_dir = Path(capsys.readouterr().out.strip())
    assert out_dir.parent == ws.run_dir and out_dir.name.startswith("eval_iter_00000002_")
    assert (out_dir / "predictions.npz").is_file() and list(out_dir.glob("sample_*.png"))
    assert (out_dir / "metrics_summary.json").is_file()
    assert not (out_dir / "metrics_summary_tracking.json").exists()
    assert streampetr([*argv, "--tasks", "detection", "tracking"]) == 0
    tracked = Path(capsys.readouterr().out.strip())
    for name in ("metrics_summary.json", "metrics_summary_tracking.json", "results_nusc_tracking.json"):
        assert (tracked / name).is_file(), name
    assert all("track_ids_3d" in p for p in load_predictions(tracked / "predictions.npz").values())
    # the training run's own evaluation is untouched
    assert sorted(p.name for p in (ws.run_dir / "eval").iterdir()) == own_evaluation
    assert {path: path.stat().st_mtime_ns for path in (ws.run_dir / "eval").rglob("*")} == before


def visualize(command: str, ws: Workspace, capsys) -> None:
    assert words(command) == ["visualize", "--run", "RUN_DIR"]
    assert "[--sample TOKEN]" in command and "[--trajectories]" in command
    token = load_infos(ws.data.val_info).samples[-1].token
    out = ws.scratch / "picture.png"
    assert streampetr(["visualize", "--run", str(ws.run_dir), "--sample", token, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.stat().st_size > 0
    assert streampetr(["visualize", "--run", str(ws.run_dir)]) == 0
    assert Path(capsys.readouterr().out.strip()).parent == list_predictions(ws.run_dir)[-1][1].parent
    # the demo recipe tracks at its evaluations: the scene's tracks can be drawn
    assert streampetr(["visualize", "--run", str(ws.run_dir), "--trajectories"]) == 0
    assert Path(capsys.readouterr().out.strip()).name.startswith("trajectories_")


def bench(command: str, ws: Workspace, capsys) -> None:
    assert words(command) == ["bench", "RECIPE"] and "--steps N --json" in command
    overrides = ws.overrides(ws.scratch / "bench")
    assert streampetr(["bench", "demo_cpu", *overrides, "--steps", "1", "--warmup", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 1 and len(report["baseline"]["train"]["step_time_s"]["times"]) == 1


def export_onnx(command: str, ws: Workspace, capsys) -> None:
    assert words(command) == ["export", "RECIPE", "--checkpoint", "PATH", "--out", "DIR"]
    out_dir = ws.scratch / "export"
    argv = ["export", "demo_cpu", *ws.overrides(ws.run_dir), "--checkpoint", str(ws.checkpoint),
            "--out", str(out_dir), "--parity-frames", "2"]
    assert streampetr(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out_dir / "streampetr.onnx")
    described = json.loads((out_dir / "export.json").read_text())
    assert {"img", "prev_exists", "time_delta"} <= {entry["name"] for entry in described["inputs"]}


def infer(command: str, ws: Workspace, capsys) -> None:
    assert words(command) == ["infer", "RECIPE", "--checkpoint", "PATH"]
    assert "[--backend onnxruntime --onnx DIR]" in command
    val_tokens = {sample.token for sample in load_infos(ws.data.val_info).samples}
    for backend in ("torch", "onnxruntime"):
        source = ["--checkpoint", str(ws.checkpoint)] if backend == "torch" else ["--onnx", str(ws.exported)]
        out_dir = ws.scratch / f"infer_{backend}"
        argv = ["infer", "demo_cpu", *ws.overrides(ws.run_dir), *source, "--backend", backend,
                "--out", str(out_dir)]
        assert streampetr(argv) == 0
        results = Path(capsys.readouterr().out.strip().splitlines()[-1])
        assert results.parent == out_dir
        assert set(json.loads(results.read_text())["results"]) == val_tokens
    assert "[--tasks detection tracking]" in command
    argv = ["infer", "demo_cpu", *ws.overrides(ws.run_dir), "--checkpoint", str(ws.checkpoint),
            "--out", str(ws.scratch / "infer_tracks"), "--tasks", "detection", "tracking"]
    assert streampetr(argv) == 0
    detection, tracking = (Path(line) for line in capsys.readouterr().out.strip().splitlines()[-2:])
    assert detection.name == "results_nusc.json" and tracking.name == "results_nusc_tracking.json"
    assert set(json.loads(tracking.read_text())["results"]) == val_tokens


RUNNERS: Dict[str, Callable[[str, Workspace, object], None]] = {
    "streampetr-run recipes/vov_8p.yaml [a.b=value ...]": train_one_process,
    "torchrun --nproc-per-node 8 -m streampetr_plugin.cli.run recipes/vov_8p.yaml": train_under_torchrun,
    "streampetr validate RECIPE": validate,
    "streampetr show RECIPE": show,
    "streampetr cp vov_8p my.yaml": copy_recipe,
    "streampetr recipes": list_recipes,
    "streampetr schema": print_schema,
    "streampetr plugins [--all] [--json]": list_plugins,
    "streampetr create-data --root data/nuscenes --version v1.0-trainval": create_data,
    "streampetr make-synthetic DIR [--scenes N --seed S]": make_synthetic,
    "streampetr eval RECIPE --checkpoint PATH [--tasks detection tracking]": evaluate,
    "streampetr visualize --run RUN_DIR [--sample TOKEN] [--trajectories]": visualize,
    "streampetr bench RECIPE [--steps N --json]": bench,
    "streampetr export RECIPE --checkpoint PATH --out DIR": export_onnx,
    "streampetr infer RECIPE --checkpoint PATH [--backend onnxruntime --onnx DIR] [--tasks detection tracking]":
        infer,
}


def test_every_table_command_has_a_runner_and_every_runner_a_command():
    commands = table_commands()
    assert len(commands) == len(set(commands))
    assert set(commands) == set(RUNNERS), {"no runner": set(commands) - set(RUNNERS),
                                           "not in README": set(RUNNERS) - set(commands)}


@pytest.mark.parametrize("command", table_commands())
def test_table_command_works(command, workspace, capsys):
    assert command in RUNNERS, f"README command without a test: {command}"
    RUNNERS[command](command, workspace, capsys)


@pytest.mark.parametrize("command", quick_start_commands())
def test_quick_start_command_resolves_validates_and_builds(command):
    # The demo itself takes minutes: its recipe is resolved, validated and built through the same command.
    program, *argv = shlex.split(command)
    assert program == "streampetr-run"
    assert streampetr_run([*argv, "runtime.max_iters=1", "--build-only"]) == 0


def test_quick_start_has_the_demo_command():
    assert any(command.startswith("streampetr-run ") for command in quick_start_commands())
