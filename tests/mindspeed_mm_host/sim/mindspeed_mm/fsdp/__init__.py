"""Part of the MindSpeed-MM SIMULATION (see mindspeed_mm/__init__.py)."""
