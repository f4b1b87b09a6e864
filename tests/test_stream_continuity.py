"""Stream continuity by scene token (the detector's inference rule)."""
from __future__ import annotations

import torch

from streampetr_plugin.models.layers.stream_continuity import SceneTokenContinuity

CPU = torch.device("cpu")


def test_a_row_continues_while_its_scene_token_is_unchanged_and_the_row_count_stays():
    continuity = SceneTokenContinuity()
    steps = [["a", "b"], ["a", "c"], ["a", "c"], ["a"], ["a"]]
    seen = [continuity.update(tokens, CPU).tolist() for tokens in steps]
    assert seen == [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0], [1.0]]
    continuity.reset()
    assert continuity.update(["a"], CPU).tolist() == [0.0]
