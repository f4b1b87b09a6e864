"""Tests of the MindSpeed-MM integration against a SIMULATED host (``sim/mindspeed_mm/__init__.py``)."""
