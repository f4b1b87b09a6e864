"""The predictions file: a lossless round trip, ragged per sample, and the run-directory layout."""
import numpy as np
import pytest
import torch

from streampetr_plugin.evaluation.predictions import (
    evaluation_dir,
    list_predictions,
    load_predictions,
    predictions_path,
    save_predictions,
)


def test_round_trip_keeps_every_sample_in_order_with_its_own_boxes(tmp_path):
    rng = np.random.default_rng(0)
    written = {
        "token-b": {"boxes_3d": torch.from_numpy(rng.normal(size=(3, 9)).astype(np.float32)),
                    "scores_3d": torch.tensor([0.9, 0.5, 0.1]), "labels_3d": torch.tensor([2, 0, 9])},
        "token-empty": {"boxes_3d": torch.zeros((0, 9)), "scores_3d": torch.zeros(0),
                        "labels_3d": torch.zeros(0, dtype=torch.long)},
        "token-a": {"boxes_3d": rng.normal(size=(1, 9)), "scores_3d": [0.3], "labels_3d": [4]},
    }
    path = save_predictions(written, tmp_path / "p.npz")
    loaded = load_predictions(path)
    assert list(loaded) == ["token-b", "token-empty", "token-a"]
    for token, prediction in written.items():
        for key in ("boxes_3d", "scores_3d", "labels_3d"):
            expected = np.asarray(prediction[key]).astype(loaded[token][key].dtype)
            np.testing.assert_array_equal(loaded[token][key], expected)
    assert loaded["token-empty"]["boxes_3d"].shape == (0, 9)
    assert loaded["token-b"]["labels_3d"].dtype == np.int64
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]  # no temporary file left behind


def test_track_and_query_ids_round_trip_when_every_sample_has_them(tmp_path):
    def sample(count, first_id):
        ids = torch.arange(first_id, first_id + count)
        return {"boxes_3d": torch.zeros((count, 9)), "scores_3d": torch.ones(count),
                "labels_3d": torch.zeros(count, dtype=torch.long), "query_ids_3d": ids, "track_ids_3d": -ids}

    written = {"a": sample(2, 10), "b": sample(0, 0), "c": sample(3, 40)}
    loaded = load_predictions(save_predictions(written, tmp_path / "ids.npz"))
    for token, prediction in written.items():
        for key in ("query_ids_3d", "track_ids_3d"):
            assert loaded[token][key].dtype == np.int64
            np.testing.assert_array_equal(loaded[token][key], prediction[key].numpy())
    del written["c"]["track_ids_3d"]  # one sample without track ids: none are written
    loaded = load_predictions(save_predictions(written, tmp_path / "some.npz"))
    assert all("track_ids_3d" not in p and "query_ids_3d" in p for p in loaded.values())
    written["a"]["query_ids_3d"] = torch.arange(5)
    with pytest.raises(ValueError, match="query_ids_3d"):
        save_predictions(written, tmp_path / "bad.npz")


def test_mismatched_lengths_and_foreign_files_are_errors(tmp_path):
    with pytest.raises(ValueError, match="sample t: 2 boxes, 1 scores, 2 labels"):
        save_predictions({"t": {"boxes_3d": np.zeros((2, 9)), "scores_3d": [1.0], "labels_3d": [0, 1]}},
                         tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", boxes_3d=np.zeros((1, 9)))
    with pytest.raises(ValueError, match="not a streampetr-predictions file"):
        load_predictions(tmp_path / "other.npz")


def test_predictions_live_in_the_evaluation_directory_of_their_iteration(tmp_path):
    assert predictions_path(tmp_path, 120) == tmp_path / "eval" / "iter_00000120" / "predictions.npz"
    assert evaluation_dir(tmp_path, 7) == tmp_path / "eval" / "iter_00000007"
    assert list_predictions(tmp_path) == []
    empty = {"t": {"boxes_3d": np.zeros((0, 9)), "scores_3d": [], "labels_3d": []}}
    for iteration in (1000, 20, 300):
        save_predictions(empty, predictions_path(tmp_path, iteration))
    evaluation_dir(tmp_path, 5000).mkdir()  # an evaluation that wrote no predictions
    assert [iteration for iteration, _ in list_predictions(tmp_path)] == [20, 300, 1000]
