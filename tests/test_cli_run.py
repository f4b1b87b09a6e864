"""streampetr-run on bad inputs: one clear message naming the file and the fix, no traceback."""
import logging

from streampetr_plugin.cli.run import EXIT_TRAINING_STOPPED, main


def test_missing_info_file_names_the_path_and_the_create_data_command(tmp_path, caplog):
    root = tmp_path / "nuscenes"
    overrides = [f"data.train.root={root}", f"data.val.root={root}", "~data.train.synthetic", "~data.val.synthetic",
                 f"runtime.work_dir={tmp_path / 'run'}"]
    with caplog.at_level(logging.ERROR):
        assert main(["demo_cpu", *overrides]) == EXIT_TRAINING_STOPPED
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    message = record.getMessage()
    assert str(root / "streampetr_infos_train.json") in message
    assert f"streampetr create-data --root {root}" in message


def test_missing_load_from_weights_name_the_file(tmp_path, caplog):
    missing = tmp_path / "ckpts" / "backbone.pth"
    with caplog.at_level(logging.ERROR):
        code = main(["demo_cpu", f"runtime.load_from={missing}", f"runtime.work_dir={tmp_path / 'run'}",
                     f"data.train.root={tmp_path / 'data'}", f"data.val.root={tmp_path / 'data'}",
                     "data.train.synthetic.scenes=2", "data.train.synthetic.samples_per_scene=2",
                     "data.train.synthetic.image_size=[100,56]", "data.val.synthetic.scenes=2",
                     "data.val.synthetic.samples_per_scene=2", "data.val.synthetic.image_size=[100,56]"])
    assert code == EXIT_TRAINING_STOPPED
    assert any(f"runtime.load_from: {missing} does not exist" in r.getMessage() for r in caplog.records)
