"""Which query every memory row came from: the identities a tracker reads off the streaming memory.

Every decoder query of a frame gets an int64 id. A learnable query gets a new one each frame; a
propagated query (one of the first P memory rows, appended to the queries) carries the id of the query
that wrote that row. :meth:`QueryIdentities.remember` gives the rows the memory writes the ids of the
queries they hold, so an object seen by the same propagated query frame after frame keeps one id, the
identity the query-propagation tracker (``streampetr_plugin.tracking``) turns into a track id. Ids are
unique between two resets of the memory.

The ids mirror :class:`~streampetr_plugin.models.layers.memory.StreamingMemory` row for row and are not
part of it: the memory's fields, its saved layout and its algebra stay the reference's. Both belong to
the detector's :class:`~streampetr_plugin.models.stream_state.StreamState`, which saves them together.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

NO_QUERY = -1  # a memory row no query wrote: never filled, or a pseudo reference point of a new stream


class QueryIdentities:
    """Ids of the memory rows of a batch of streams (``row_ids`` (B, R) int64, ``NO_QUERY`` where none).

    Args:
        capacity: rows the memory keeps from one frame to the next (its ``capacity``).
    """

    def __init__(self, *, capacity: int) -> None:
        self.capacity = capacity
        self.row_ids: Optional[torch.Tensor] = None
        self._next_id = 0

    def reset(self) -> None:
        """Forget every row (with :meth:`StreamingMemory.reset`) and number queries from 0 again, so the
        same frames after a reset get the same ids in any process."""
        self.row_ids = None
        self._next_id = 0

    def save(self) -> Dict[str, torch.Tensor]:
        """``query_ids`` (B, R) int64 (clone) and ``next_query_id`` () int64; empty when no row is held."""
        if self.row_ids is None:
            return {}
        return {"query_ids": self.row_ids.clone(), "next_query_id": torch.tensor(self._next_id)}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`save`; a state without ids (a memory saved on its own) resets them."""
        if "query_ids" not in state:
            self.reset()
            return
        self.row_ids = state["query_ids"].clone()
        self._next_id = int(state["next_query_id"])

    def query_ids(self, *, prev_exists: torch.Tensor, num_fresh: int, num_propagated: int) -> torch.Tensor:
        """Ids (B, num_fresh + num_propagated) of this frame's queries, in the decoder's order: the
        learnable queries, then the propagated rows. Call it where the memory's ``pre_update`` runs.

        Rows are kept and cleared as ``pre_update`` keeps and clears them: the newest ``capacity``, and
        none of a stream that restarts (``prev_exists`` (B,) 0). A propagated row without an id (a pseudo
        reference point) gets a new one, like a learnable query.
        """
        batch = prev_exists.size(0)
        count = batch * (num_fresh + num_propagated)
        ids = torch.arange(self._next_id, self._next_id + count, device=prev_exists.device)
        ids = ids.view(batch, num_fresh + num_propagated)
        self._next_id += count
        if self.row_ids is None or self.row_ids.size(0) != batch:
            self.row_ids = torch.full((batch, self.capacity), NO_QUERY, dtype=torch.int64, device=ids.device)
        continues = prev_exists.view(batch, 1) > 0
        self.row_ids = torch.where(continues, self.row_ids[:, : self.capacity], NO_QUERY)
        carried = self.row_ids[:, :num_propagated]
        ids[:, num_fresh:] = torch.where(carried != NO_QUERY, carried, ids[:, num_fresh:])
        return ids

    def remember(self, *, query_ids: torch.Tensor, written: torch.Tensor) -> None:
        """Prepend the ids of the queries the memory just wrote: ``written`` (B, K) indexes ``query_ids``
        (B, Q'), as :meth:`StreamingMemory.post_update`'s returned rows index its queries."""
        self.row_ids = torch.cat([torch.gather(query_ids, 1, written), self.row_ids], dim=1)
