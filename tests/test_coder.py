"""NMS-free decoding: top-k over (query, class) pairs, box decoding, range and score filters."""
import math

import pytest
import torch

from streampetr_plugin.models.coders.nms_free_coder import NMSFreeCoder


def _code(x, y, z, yaw=0.0, size=(4.0, 2.0, 1.5), velocity=(0.0, 0.0)):
    return [x, y, z, *[math.log(s) for s in size], math.sin(yaw), math.cos(yaw), *velocity]


def test_top_k_is_query_major_with_label_modulo_classes():
    logits = torch.full((1, 4, 3), -10.0)
    logits[0, 2, 1] = 3.0  # best pair: query 2, class 1
    logits[0, 0, 2] = 2.0
    logits[0, 2, 0] = 1.0  # the same query again with another class
    codes = torch.tensor([[_code(1, 1, 0), _code(2, 2, 0), _code(3, 3, 0, yaw=2.0), _code(4, 4, 0)]])
    coder = NMSFreeCoder(max_num=3, num_classes=3)
    decoded = coder.decode(logits, codes)[0]
    assert decoded["query_index"].tolist() == [2, 0, 2]
    assert decoded["labels"].tolist() == [1, 2, 0]
    expected_scores = [1 / (1 + math.exp(-v)) for v in (3.0, 2.0, 1.0)]
    assert decoded["scores"].tolist() == pytest.approx(expected_scores)
    box = decoded["bboxes"][0]
    assert box.shape == (9,)
    assert box.tolist() == pytest.approx([3, 3, 0, 4.0, 2.0, 1.5, 2.0, 0.0, 0.0], abs=1e-6)  # gravity z kept


def test_post_center_range_and_score_threshold_filter():
    logits = torch.tensor([[[4.0], [3.0], [2.0], [-3.0]]])
    codes = torch.tensor([[_code(0, 0, 0), _code(70, 0, 0), _code(0, 0, -11), _code(1, 1, 0)]])
    coder = NMSFreeCoder(post_center_range=[-61.2, -61.2, -10.0, 61.2, 61.2, 10.0], max_num=4, num_classes=1)
    assert coder.decode(logits, codes)[0]["query_index"].tolist() == [0, 3]
    thresholded = NMSFreeCoder(max_num=4, num_classes=1, score_threshold=0.5).decode(logits, codes)[0]
    assert thresholded["query_index"].tolist() == [0]
    unfiltered = NMSFreeCoder(post_center_range=None, max_num=4, num_classes=1).decode(logits, codes)[0]
    assert unfiltered["query_index"].tolist() == [0, 1, 2, 3]


def test_batch_rows_are_decoded_independently():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 3, generator=generator)
    centres = torch.rand(2, 6, 3, generator=generator) * 10
    codes = torch.cat([centres, torch.randn(2, 6, 7, generator=generator)], -1)
    coder = NMSFreeCoder(max_num=5, num_classes=3)
    batched = coder.decode(logits, codes)
    for b in range(2):
        single = coder.decode(logits[b : b + 1], codes[b : b + 1])[0]
        for key in ("bboxes", "scores", "labels", "query_index"):
            assert torch.equal(batched[b][key], single[key])
        expected_scores, _ = torch.sigmoid(logits[b]).flatten().sort(descending=True)
        assert torch.equal(batched[b]["scores"], expected_scores[:5])


def test_defaults_are_the_recipe():
    coder = NMSFreeCoder()
    assert coder.max_num == 300 and coder.num_classes == 10 and coder.score_threshold is None
    assert coder.post_center_range == [-61.2, -61.2, -10.0, 61.2, 61.2, 10.0]


def test_nms_radius_drops_lower_scoring_boxes_of_the_same_class_nearby():
    # Scores descend with the query index; centres: query 1 is 1.2 m from query 0, query 2 lies 1.2 m
    # beyond query 1 (2.4 m from query 0), query 3 is on query 0 but of the other class.
    logits = torch.full((1, 4, 2), -10.0)
    logits[0, :, 0] = torch.tensor([4.0, 3.0, 2.0, -10.0])
    logits[0, 3, 1] = 1.0
    codes = torch.tensor([[_code(10, 0, 0), _code(11.2, 0, 0), _code(12.4, 0, 0), _code(10, 0, 0)]])
    unsuppressed = NMSFreeCoder(max_num=4, num_classes=2).decode(logits, codes)[0]
    assert unsuppressed["query_index"].tolist() == [0, 1, 2, 3]
    decoded = NMSFreeCoder(max_num=4, num_classes=2, nms_radius=1.5).decode(logits, codes)[0]
    # Query 1 goes (near the kept query 0); query 2 stays: only kept boxes suppress (greedy).
    assert decoded["query_index"].tolist() == [0, 2, 3]
    assert decoded["labels"].tolist() == [0, 0, 1]
    wide = NMSFreeCoder(max_num=4, num_classes=2, nms_radius=2.5).decode(logits, codes)[0]
    assert wide["query_index"].tolist() == [0, 3]
