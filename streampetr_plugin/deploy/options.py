"""The choices and defaults of ``streampetr export`` and ``streampetr infer`` (light to import: the command
line reads them to build its parser)."""
from __future__ import annotations

DEFAULT_OPSET = 18
MIN_OPSET = 18  # the lowest the dynamo exporter writes (it raises lower requests to 18)
DEFAULT_PARITY_FRAMES = 8
BACKENDS = ("torch", "onnxruntime")
SPLITS = ("val", "train")
