"""Query identities: propagated queries carry the id of the query that wrote their memory row."""
from __future__ import annotations

import torch

from streampetr_plugin.models.layers.query_identities import NO_QUERY, QueryIdentities

FRESH, PROPAGATED, CAPACITY = 5, 3, 4


def _ids(identities, prev_exists):
    return identities.query_ids(prev_exists=torch.tensor(prev_exists, dtype=torch.float32),
                                num_fresh=FRESH, num_propagated=PROPAGATED)


def test_first_frame_queries_all_get_new_distinct_ids():
    identities = QueryIdentities(capacity=CAPACITY)
    ids = _ids(identities, [0.0, 0.0])
    assert ids.shape == (2, FRESH + PROPAGATED) and ids.dtype == torch.int64
    assert len(set(ids.flatten().tolist())) == ids.numel()
    assert (identities.row_ids == NO_QUERY).all()


def test_propagated_slots_carry_the_ids_the_memory_wrote_and_fresh_ones_are_new():
    identities = QueryIdentities(capacity=CAPACITY)
    first = _ids(identities, [0.0, 0.0])
    written = torch.tensor([[6, 0, 2], [1, 7, 3]])  # the memory's top-3 of each stream, best first
    identities.remember(query_ids=first, written=written)
    second = _ids(identities, [1.0, 1.0])
    expected = torch.stack([first[0, [6, 0, 2]], first[1, [1, 7, 3]]])
    assert torch.equal(second[:, FRESH:], expected)
    assert not set(second[:, :FRESH].flatten().tolist()) & set(first.flatten().tolist())


def test_a_restarted_stream_forgets_its_rows():
    identities = QueryIdentities(capacity=CAPACITY)
    first = _ids(identities, [0.0, 0.0])
    identities.remember(query_ids=first, written=torch.tensor([[0, 1, 2], [0, 1, 2]]))
    second = _ids(identities, [1.0, 0.0])  # stream 1 enters a new scene
    assert torch.equal(second[0, FRESH:], first[0, :3])
    assert not set(second[1].tolist()) & set(first.flatten().tolist())
    assert (identities.row_ids[1] == NO_QUERY).all()


def test_rows_beyond_capacity_are_dropped_as_the_memory_drops_them():
    identities = QueryIdentities(capacity=CAPACITY)
    history = []
    for frame in range(3):
        ids = _ids(identities, [float(frame > 0)])
        assert identities.row_ids.shape == (1, CAPACITY)
        written = torch.tensor([[0, 1, 2]])
        identities.remember(query_ids=ids, written=written)
        history.append(ids[0, :3])
    assert identities.row_ids.shape == (1, CAPACITY + 3)
    # newest rows first: this frame's three, then the newest one kept of the frame before
    assert identities.row_ids[0, :4].tolist() == [*history[2].tolist(), history[1][0].item()]
