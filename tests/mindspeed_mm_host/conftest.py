"""Fixtures of the MindSpeed-MM host simulation tests."""

from data_fixtures import synthetic_nuscenes, synthetic_params  # noqa: F401

from .harness import simulated_host  # noqa: F401
