"""Shared fixtures: the session-scoped tiny synthetic nuScenes (generated once per test run)."""
from data_fixtures import synthetic_nusc, synthetic_nuscenes, synthetic_params  # noqa: F401  (session fixtures)
