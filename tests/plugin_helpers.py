"""Throwaway plugin distributions for tests: real ``importlib.metadata`` discovery, no pip."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Dict


def write_distribution(root: Path, dist_name: str, entry_points: Dict[str, str], modules: Dict[str, str]) -> Path:
    """Write modules and a ``<dist>.dist-info`` (METADATA + entry_points.txt) under ``root``.

    ``entry_points`` maps entry-point name -> ``module:attr`` or ``module``; ``modules`` maps a module
    file name (``foo.py``) -> source. Put ``root`` on ``sys.path`` to make the distribution visible.
    """
    root.mkdir(parents=True, exist_ok=True)
    for filename, source in modules.items():
        (root / filename).write_text(textwrap.dedent(source))
    info = root / f"{dist_name.replace('-', '_')}-0.3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.3.1\n")
    lines = ["[streampetr]"] + [f"{name} = {target}" for name, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return root


def activate(root: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(root))
    for name in list(sys.modules):
        if (root / f"{name}.py").exists():
            del sys.modules[name]


TINY_BACKBONE_PLUGIN = '''
import torch
from torch import nn
from pydantic import BaseModel, ConfigDict, Field

from streampetr_plugin import hookimpl
from streampetr_plugin.models.backbones.contract import ShapeSpec


class TinyConvParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(16, ge=1, description="channels of both outputs")


class TinyConv(nn.Module):
    def __init__(self, params: TinyConvParams) -> None:
        super().__init__()
        width = self.width = params.width
        self.c4 = nn.Conv2d(3, width, kernel_size=16, stride=16)
        self.c5 = nn.Conv2d(width, width, kernel_size=2, stride=2)

    def forward(self, images):
        c4 = self.c4(images)
        return {"c4": c4, "c5": self.c5(c4)}

    def output_shape(self):
        return {"c4": ShapeSpec(self.width, 16), "c5": ShapeSpec(self.width, 32)}


@hookimpl
def streampetr_register_backbones(register):
    register("tiny_conv", TinyConv, params=TinyConvParams)
'''
