"""streampetr-run on bad inputs: one clear message naming the file and the fix, no traceback."""
from streampetr_plugin.cli.run import main
from streampetr_plugin.errors import EXIT_BAD_INPUT


def error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


def test_missing_info_file_names_the_path_and_the_create_data_command(tmp_path, capsys):
    root = tmp_path / "nuscenes"
    overrides = [f"data.train.root={root}", f"data.val.root={root}", "~data.train.synthetic", "~data.val.synthetic",
                 f"runtime.work_dir={tmp_path / 'run'}"]
    assert main(["demo_cpu", *overrides]) == EXIT_BAD_INPUT
    (message,) = error_lines(capsys)
    assert str(root / "streampetr_infos_train.json") in message
    assert f"streampetr create-data --root {root}" in message


def test_missing_load_from_weights_name_the_file(tmp_path, capsys):
    missing = tmp_path / "ckpts" / "backbone.pth"
    code = main(["demo_cpu", f"runtime.load_from={missing}", f"runtime.work_dir={tmp_path / 'run'}",
                 f"data.train.root={tmp_path / 'data'}", f"data.val.root={tmp_path / 'data'}",
                 "data.train.synthetic.scenes=2", "data.train.synthetic.samples_per_scene=2",
                 "data.train.synthetic.image_size=[100,56]", "data.val.synthetic.scenes=2",
                 "data.val.synthetic.samples_per_scene=2", "data.val.synthetic.image_size=[100,56]"])
    assert code == EXIT_BAD_INPUT
    (message,) = error_lines(capsys)
    assert message.startswith(f"error: runtime.load_from: {missing} does not exist (")
