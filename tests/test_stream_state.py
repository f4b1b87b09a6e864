"""The detector's stream state: reset, save / load (also from a checkpoint saved before it held query ids),
scene changes, and the hand-over between inference and training."""
from __future__ import annotations

import io

import torch

from streampetr_plugin.models.layers.memory import MEMORY_FIELDS
from streampetr_plugin.models.stream_state import StreamState
from streampetr_plugin.training.checkpointing import load_stream_states, stream_states
from tests.test_detector import tiny_batch, tiny_detector

ALL_ROWS_CONTINUE = torch.ones(2)


def _detections(outputs):
    return [{name: value.clone() for name, value in row.items()} for row in outputs.detections]


def _assert_same_detections(got, expected, names=("boxes_3d", "scores_3d", "labels_3d", "query_ids_3d")):
    for got_row, expected_row in zip(got, expected):
        for name in names:
            assert torch.equal(got_row[name], expected_row[name]), name


def test_reset_forgets_the_memory_the_query_ids_and_the_previous_scenes():
    model = tiny_detector().eval()
    first = _detections(model(tiny_batch(0)))
    model(tiny_batch(1))
    state = model.stream_state
    assert not state.memory.is_empty and state.query_identities.row_ids is not None
    state.reset()
    assert state.memory.is_empty and state.query_identities.row_ids is None
    # Same scene tokens as before the reset: the streams still start afresh, with ids numbered from 0.
    _assert_same_detections(_detections(model(tiny_batch(0))), first)


def test_saved_state_resumes_the_same_outputs_in_another_detector():
    model = tiny_detector(seed=1).eval()
    model.infer(tiny_batch(0), prev_exists=torch.zeros(2))
    buffer = io.BytesIO()
    torch.save(model.stream_state.save(), buffer)  # plain tensors: loads with weights_only
    buffer.seek(0)
    expected = _detections(model.infer(tiny_batch(1), prev_exists=ALL_ROWS_CONTINUE))

    restored = tiny_detector(seed=2).eval()
    restored.load_state_dict(model.state_dict())
    restored.stream_state.load(torch.load(buffer, weights_only=True))
    _assert_same_detections(
        _detections(restored.infer(tiny_batch(1), prev_exists=ALL_ROWS_CONTINUE)), expected
    )


def test_a_checkpoint_holding_only_the_memory_queue_resumes_the_same_detections():
    # The streams entry as checkpoints held it before the state saved query ids: the memory's five fields
    # under the head's module name, CPU tensors.
    model = tiny_detector(seed=1).eval()
    model.infer(tiny_batch(0), prev_exists=torch.zeros(2))
    memory = model.stream_state.memory
    old_entry = {"pts_bbox_head": {name: getattr(memory, name).clone() for name in MEMORY_FIELDS}}
    expected = _detections(model.infer(tiny_batch(1), prev_exists=ALL_ROWS_CONTINUE))

    restored = tiny_detector(seed=1).eval()
    restored.infer(tiny_batch(5), prev_exists=torch.zeros(2))  # streams of its own, to be replaced
    load_stream_states(restored, old_entry, torch.device("cpu"))
    got = _detections(restored.infer(tiny_batch(1), prev_exists=ALL_ROWS_CONTINUE))
    _assert_same_detections(got, expected, names=("boxes_3d", "scores_3d", "labels_3d"))
    # Without saved ids the identities start afresh, numbered from 0 (frame 5 used the first 2 x 20 ids).
    queries_per_frame = 2 * (16 + 4)
    assert max(int(row["query_ids_3d"].max()) for row in got) < queries_per_frame


def test_checkpoint_entry_round_trips_through_the_trainers_functions():
    model = tiny_detector().train()
    model(tiny_batch(0))
    saved = stream_states(model)
    assert set(saved) == {"pts_bbox_head"}
    assert set(saved["pts_bbox_head"]) == {*MEMORY_FIELDS, "query_ids", "next_query_id"}
    other = tiny_detector().train()
    load_stream_states(other, saved, torch.device("cpu"))
    for name, value in model.stream_state.save()["pts_bbox_head"].items():
        assert torch.equal(other.stream_state.save()["pts_bbox_head"][name], value), name
    load_stream_states(other, {"pts_bbox_head": {}}, torch.device("cpu"))  # an empty memory was saved
    assert other.stream_state.memory.is_empty


def test_a_row_entering_a_new_scene_gives_what_a_fresh_stream_gives():
    model = tiny_detector().eval()
    model(tiny_batch(0, scene_tokens=["a", "b"]))
    streaming = _detections(model(tiny_batch(1, scene_tokens=["a", "c"])))  # row 1 changes scene
    fresh = tiny_detector().eval()
    restarted = _detections(fresh(tiny_batch(1, scene_tokens=["a", "c"])))
    for name in ("boxes_3d", "scores_3d", "labels_3d"):
        assert torch.equal(streaming[1][name], restarted[1][name]), name
    assert not torch.equal(streaming[0]["scores_3d"], restarted[0]["scores_3d"])  # row 0 continued


def _start_streams(state: StreamState, count: int) -> None:
    """Fill the memory with ``count`` streams at their first frame."""
    state.memory.pre_update(
        prev_exists=torch.zeros(count), timestamp=torch.zeros(count, dtype=torch.float64),
        ego_pose_inv=torch.eye(4).expand(count, 4, 4),
    )


def test_training_after_inference_forgets_those_streams_but_keeps_the_frame_positions():
    state = StreamState(memory_len=4, embed_dims=2)
    _start_streams(state, 1)
    state.scenes.update(["scene-a"], torch.device("cpu"))
    state.frames.update(torch.tensor([3]), torch.tensor([7]))
    state.begin_inference()
    state.begin_training()
    assert state.memory.is_empty
    assert state.scenes.update(["scene-a"], torch.device("cpu")).tolist() == [0.0]
    assert state.frames.update(torch.tensor([3]), torch.tensor([8])).tolist() == [1.0]
    state.begin_training()  # a second training frame keeps what the first one wrote
    _start_streams(state, 1)
    state.begin_training()
    assert not state.memory.is_empty


def test_a_different_number_of_streams_starts_every_stream_afresh():
    state = StreamState(memory_len=4, embed_dims=2)
    assert torch.equal(state.fit_streams(torch.ones(2)), torch.ones(2))  # empty memory: as given
    _start_streams(state, 2)
    assert torch.equal(state.fit_streams(torch.ones(2)), torch.ones(2))
    assert torch.equal(state.fit_streams(torch.ones(3)), torch.zeros(3))
    assert state.memory.is_empty
