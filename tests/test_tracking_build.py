"""The recipe's ``tracking`` section and the ``trackers`` registry: built-ins and a third-party tracker."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict, Field

from streampetr_plugin import hookimpl
from streampetr_plugin.config.loader import RecipeError, load_recipe
from streampetr_plugin.host import create_plugin_host
from streampetr_plugin.tracking.build import build_tracker
from streampetr_plugin.tracking.centerpoint import CenterPointTracker
from streampetr_plugin.tracking.query_propagation import QueryPropagationTracker


@pytest.fixture
def fresh_host():
    return create_plugin_host()


def test_the_default_tracker_is_query_propagation_with_its_defaults_filled_in(fresh_host):
    recipe = load_recipe("demo_cpu", host=fresh_host)
    assert recipe.tracking.type == "query_propagation"
    tracker = build_tracker(recipe, fresh_host.registries)
    assert isinstance(tracker, QueryPropagationTracker)
    assert recipe.tracking.options()["max_age"] == tracker.params.max_age == 3
    assert recipe.tracking.options()["rematch"] is tracker.params.rematch is True


def test_tracker_options_come_from_the_recipe_and_are_checked(fresh_host):
    recipe = load_recipe("demo_cpu", ["tracking.rematch=false", "tracking.birth_score=0.5"], host=fresh_host)
    tracker = build_tracker(recipe, fresh_host.registries)
    assert tracker.params.rematch is False and tracker.params.birth_score == 0.5
    recipe = load_recipe("demo_cpu", ["tracking.type=centerpoint", "tracking.max_age=1"], host=fresh_host)
    tracker = build_tracker(recipe, fresh_host.registries)
    assert isinstance(tracker, CenterPointTracker) and tracker.params.max_age == 1
    with pytest.raises(RecipeError, match="tracking.rematch"):
        load_recipe("demo_cpu", ["tracking.type=centerpoint", "tracking.rematch=false"], host=fresh_host)
    with pytest.raises(RecipeError, match="unknown tracker 'centrepoint'.*did you mean 'centerpoint'"):
        load_recipe("demo_cpu", ["tracking.type=centrepoint"], host=fresh_host)


class EveryoneOneTrackParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    track_id: int = Field(7, ge=0, description="the one id")


class EveryoneOneTrack:
    """A third-party tracker: every detection belongs to one track."""

    def __init__(self, params: EveryoneOneTrackParams) -> None:
        self.track_id = params.track_id

    def reset(self) -> None:
        pass

    def update(self, frame):
        return np.full(len(frame), self.track_id, dtype=np.int64)


class TrackerPlugin:
    @hookimpl
    def streampetr_register_trackers(self, register):
        register("one_track", EveryoneOneTrack, params=EveryoneOneTrackParams)


def test_a_plugin_tracker_is_built_from_the_recipe(fresh_host):
    fresh_host.register_plugin(TrackerPlugin(), name="one-track")
    recipe = load_recipe("demo_cpu", ["tracking.type=one_track", "tracking.track_id=3"], host=fresh_host)
    tracker = build_tracker(recipe, fresh_host.registries)
    assert isinstance(tracker, EveryoneOneTrack) and tracker.track_id == 3
    assert fresh_host.registries.trackers.get("one_track").provider == "one-track"
    with pytest.raises(RecipeError, match="tracking.track_id"):
        load_recipe("demo_cpu", ["tracking.type=one_track", "tracking.track_id=-1"], host=fresh_host)
