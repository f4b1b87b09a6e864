"""Bad input through the real entry points: one ``error: <file or key>: ...`` line, the right exit status
(2 bad input, 1 a failed run), no traceback unless asked for.

Every damaged file is made here, small, under ``tmp_path``; the data is the tests' tiny synthetic
nuScenes (``tests/data_fixtures.py``) and the recipe the demo shrunk to seconds (``tests/tiny_demo.py``).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from data_fixtures import synthetic_nuscenes  # noqa: F401  (session fixture)
from streampetr_plugin import __version__
from streampetr_plugin.cli.main import main as streampetr
from streampetr_plugin.cli.run import main as streampetr_run
from streampetr_plugin.errors import EXIT_BAD_INPUT, EXIT_FAILURE
from tests.tiny_demo import tiny_demo_overrides
from tests.trainer_helpers import subprocess_env


@pytest.fixture(autouse=True)
def restore_threads():
    """The commands run the recipe's cpu_threads adapter (torch.set_num_threads): restore the count."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def the_error_line(capsys) -> str:
    """The one ``error:`` line on stderr (log lines may come before it; a traceback may not)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def data_root(tmp_path, synthetic_nuscenes):  # noqa: F811
    """A copy of the tiny dataset root whose info files a test may damage (the rest is linked)."""
    root = tmp_path / "nuscenes"
    root.mkdir()
    for item in synthetic_nuscenes.root.iterdir():
        if item.name.startswith("streampetr_infos_"):
            shutil.copy(item, root / item.name)
        else:
            (root / item.name).symlink_to(item)
    return root


def tiny(root, tmp_path, version):
    return tiny_demo_overrides(root, version, tmp_path / "run")


# ------------------------------------------------------------------------------------------ checkpoints


def _truncated_checkpoint(path):
    torch.save({"state_dict": {"weight": torch.zeros(4096)}}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CHECKPOINTS = {
    "missing": lambda path: None,
    "empty": lambda path: path.write_bytes(b""),
    "truncated": _truncated_checkpoint,
    "random bytes": lambda path: path.write_bytes(os.urandom(4096)),
}


@pytest.mark.parametrize("damage", sorted(CHECKPOINTS))
def test_eval_of_an_unusable_checkpoint_is_one_line_naming_it(
    damage, tmp_path, capsys, synthetic_nuscenes  # noqa: F811
):
    checkpoint = tmp_path / "iter_00000002.pth"
    CHECKPOINTS[damage](checkpoint)
    overrides = tiny(synthetic_nuscenes.root, tmp_path, synthetic_nuscenes.version)
    assert streampetr(["eval", "demo_cpu", *overrides, "--checkpoint", str(checkpoint)]) == EXIT_BAD_INPUT
    line = the_error_line(capsys)
    assert line.startswith(f"error: {checkpoint}: ")
    assert "unpickled" not in line  # damaged data is not code that was refused
    assert not list((tmp_path / "run").glob("eval_*"))


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_unusable_load_from_weights_are_one_line_naming_the_file(
    damage, tmp_path, capsys, synthetic_nuscenes  # noqa: F811
):
    weights = tmp_path / "pretrained.pth"
    CHECKPOINTS[damage](weights)
    overrides = tiny(synthetic_nuscenes.root, tmp_path, synthetic_nuscenes.version)
    assert streampetr_run(["demo_cpu", *overrides, f"runtime.load_from={weights}"]) == EXIT_BAD_INPUT
    assert the_error_line(capsys).startswith(f"error: {weights}: ")


# ---------------------------------------------------------------------------------------------- infos


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _without_camera_records(path):
    header = json.loads(path.read_text())
    for sample in header["samples"]:
        del sample["cams"]
    path.write_text(json.dumps(header))


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# what to damage -> (file, damage)
INFO_DAMAGE = {
    "truncated json": ("streampetr_infos_train.json", _truncate),
    "wrong shape": ("streampetr_infos_train.json", _without_camera_records),
    "a list, not a header": ("streampetr_infos_train.json", lambda path: path.write_text("[1, 2, 3]")),
    "corrupt json": ("streampetr_infos_train.json", lambda path: path.write_bytes(b"{\"format\": \xff\xfe}")),
    "npz checksum": ("streampetr_infos_train.npz", _flip_a_byte),
}


@pytest.mark.parametrize("damage", sorted(INFO_DAMAGE))
def test_damaged_info_file_is_one_line_naming_the_file(
    damage, data_root, tmp_path, capsys, synthetic_nuscenes  # noqa: F811
):
    name, spoil = INFO_DAMAGE[damage]
    spoil(data_root / name)
    overrides = tiny(data_root, tmp_path, synthetic_nuscenes.version)
    assert streampetr_run(["demo_cpu", *overrides]) == EXIT_BAD_INPUT
    line = the_error_line(capsys)
    assert line.startswith(f"error: {data_root / name}: ")
    assert f"streampetr create-data --root {data_root}" in line


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("damage", ["truncated", "needs code"])
def test_damaged_reference_pkl_is_one_line_naming_the_file(
    damage, data_root, tmp_path, capsys, synthetic_nuscenes  # noqa: F811
):
    pkl = data_root / "nuscenes2d_temporal_infos_train.pkl"
    marker = tmp_path / "code_ran"
    if damage == "truncated":
        pkl.write_bytes(pickle.dumps({"infos": [{"token": "a" * 64}] * 8, "metadata": {}})[:40])
    else:
        pkl.write_bytes(pickle.dumps({"infos": [_RunsCode(marker)], "metadata": {}}))
    overrides = tiny(data_root, tmp_path, synthetic_nuscenes.version) + [f"data.train.train_info={pkl.name}"]
    assert streampetr_run(["demo_cpu", *overrides]) == EXIT_BAD_INPUT
    assert the_error_line(capsys).startswith(f"error: {pkl}: ")
    assert not marker.exists()


# ------------------------------------------------------------------------------ recipes and work dirs


def test_recipe_that_is_not_utf8_names_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("_base_: demo_cpu.yaml\ndescription: caf\u00e9\n".encode("latin-1"))
    assert streampetr(["validate", str(recipe)]) == EXIT_BAD_INPUT
    line = the_error_line(capsys)
    assert line.startswith(f"error: {recipe}:2: ") and "UTF-8" in line


@pytest.mark.parametrize("where", ["read-only directory", "below a file"])
def test_work_dir_that_cannot_be_written_is_refused_before_training(where, tmp_path, capsys):
    if where == "read-only directory":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        parent = tmp_path / "locked"
        parent.mkdir(mode=0o555)
    else:
        parent = tmp_path / "a_file"
        parent.write_text("not a directory")
    work_dir = parent / "run"
    assert streampetr_run(["demo_cpu", f"runtime.work_dir={work_dir}"]) == EXIT_BAD_INPUT
    line = the_error_line(capsys)
    assert line.startswith(f"error: runtime.work_dir: {work_dir} is not a writable directory (")
    assert not work_dir.exists()


# ---------------------------------------------------------------------------------------- create-data


def test_create_data_on_a_missing_root_names_it(tmp_path, capsys):
    root = tmp_path / "no_such_root"
    assert streampetr(["create-data", "--root", str(root), "--version", "v1.0-mini"]) == EXIT_BAD_INPUT
    assert the_error_line(capsys).startswith(f"error: {root}: no such directory (")


def test_create_data_names_the_wrong_version_folder(tmp_path, capsys, synthetic_nuscenes):  # noqa: F811
    assert streampetr(["create-data", "--root", str(synthetic_nuscenes.root), "--out-dir", str(tmp_path),
                       "--version", "v1.0-trainval"]) == EXIT_BAD_INPUT
    line = the_error_line(capsys)
    assert line.startswith(f"error: {synthetic_nuscenes.root / 'v1.0-trainval'}: ") and "v1.0-mini" in line


def test_create_data_names_a_truncated_table(tmp_path, capsys, synthetic_nuscenes):  # noqa: F811
    root = tmp_path / "nuscenes"
    shutil.copytree(synthetic_nuscenes.root / synthetic_nuscenes.version, root / synthetic_nuscenes.version)
    table = root / synthetic_nuscenes.version / "sample.json"
    _truncate(table)
    argv = ["create-data", "--root", str(root), "--version", synthetic_nuscenes.version]
    assert streampetr(argv) == EXIT_BAD_INPUT
    assert the_error_line(capsys).startswith(f"error: {table}: is not valid JSON")


def test_make_synthetic_refuses_too_few_scenes(tmp_path, capsys):
    assert streampetr(["make-synthetic", str(tmp_path / "syn"), "--scenes", "1"]) == EXIT_BAD_INPUT
    assert the_error_line(capsys).startswith("error: --scenes: 1 is too few (")


# ------------------------------------------------------------------------- usage, debug and the unexpected


def test_usage_errors_are_one_line_naming_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        streampetr(["eval", "demo_cpu"])
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert the_error_line(capsys) == ("error: streampetr eval: the following arguments are required: "
                                      "--checkpoint (see streampetr eval --help)")


def test_debug_flag_and_variable_show_the_traceback(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(b"name: caf\xe9\n")
    assert streampetr(["--debug", "validate", str(recipe)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith(f"error: {recipe}:1: ")
    monkeypatch.setenv("STREAMPETR_DEBUG", "1")
    assert streampetr_run([str(recipe)]) == EXIT_BAD_INPUT
    assert "Traceback" in capsys.readouterr().err


def test_unexpected_error_is_one_line_with_its_type(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("streampetr_plugin.config.loader.load_recipe", broken)
    assert streampetr(["validate", "demo_cpu"]) == EXIT_FAILURE
    assert the_error_line(capsys) == (
        "error: unexpected ZeroDivisionError: division by zero (run with --debug for the traceback)"
    )


def test_version_on_both_entry_points(capsys):
    for main, prog in ((streampetr, "streampetr"), (streampetr_run, "streampetr-run")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--version"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.strip() == f"{prog} {__version__}"


def test_make_synthetic_help_describes_dir_and_seed(capsys):
    with pytest.raises(SystemExit):
        streampetr(["make-synthetic", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "DIR output directory" in text and "--seed SEED random seed" in text


def test_console_process_exits_2_with_one_line(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(b"name: caf\xe9\n")
    done = subprocess.run([sys.executable, "-m", "streampetr_plugin.cli.run", str(recipe)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.splitlines() == [
        f"error: {recipe}:1: <encoding>: not UTF-8 text (byte 0xe9; save the file as UTF-8)"
    ]
