"""Graph capture of the detector's static-shape parts, as adapters (off by default: eager is the default
until a measurement says otherwise).

* ``graph_capture`` (CUDA, CPU): ``torch.compile`` with a ``mode`` option: ``default``,
  ``reduce-overhead`` (on CUDA: the compiled graph replayed as CUDA graphs, one launch for all its
  kernels) or ``max-autotune-no-cudagraphs``; ``backend: aot_eager`` traces the same graphs but runs
  them with the eager kernels (no code generation, so no C++ compiler needed: numerics checks);
* ``inference_graph_capture`` (CUDA, CPU; evaluation, inference and benchmarks, never training or
  export): ``torch.compile`` with inductor after the weights are loaded and BatchNorms folded, with
  ``freezing`` (the eval weights become constants of the graph: constant folding, and on the CPU
  convolution weights pre-packed for oneDNN once instead of at every call). Measured on a 2-core CPU
  (docs/benchmarks.md) it takes 14% off a ResNet-50 frame and 10% off a V2-99 frame; the first frame
  pays the compilation;
* ``npu_graph_capture`` (NPU): the same modules through torch_npu's graph mode, torchair (bundled with
  torch_npu as ``torch_npu.dynamo.torchair``; ``import torch_npu`` makes it importable as ``torchair``):
  ``torchair.get_npu_backend(compiler_config=config)`` with ``config.mode`` ``npugraph_ex`` (captured
  and replayed as NPU graphs, the CUDA-graph analogue), ``reduce-overhead`` (the older name of the same
  capture, deprecated in torch_npu 2.14) or ``max-autotune`` (the whole graph compiled by the graph
  engine). The names and signatures used here are those of torch_npu 2.14's Python files
  (tests/fixtures/torch_npu_2.14_graph_api.json records them).

What is captured (``targets``), each module compiled in place (``nn.Module.compile``: parameters,
state-dict keys and checkpoints stay as they are), one graph per input shape (``dynamic=False``:
training and evaluation batch sizes compile once each):

* ``img_backbone`` and ``img_neck`` (the default): images of one fixed shape per recipe in, feature
  maps out, no host reads; GridMask runs before the backbone, outside the captured graph;
* ``img_roi_head`` (the 2D auxiliary head): fixed-size feature maps in, dense maps and a fixed-size
  top-k out, so it captures too; its loss and matching stay eager;
* never ``pts_bbox_head``: in training its denoising queries number ``groups x`` the frame's largest
  ground-truth count (a new shape, so a new graph, almost every frame), its streaming memory is a
  Python object updated between frames, and the detections are decoded with a data-dependent
  ``nonzero``: there it would recompile or break the graph rather than run faster.
"""
from __future__ import annotations

import importlib
from typing import Any, ClassVar, Dict, List, Literal, Optional, Sequence, Tuple

import torch
from pydantic import BaseModel, ConfigDict, Field

from streampetr_plugin.adapters.base import Adapter, AdapterContext, AdapterResult, Phase
from streampetr_plugin.adapters.device import import_torch_npu, torch_npu_installed

CaptureTarget = Literal["img_backbone", "img_neck", "img_roi_head"]
DEFAULT_TARGETS: Tuple[str, ...] = ("img_backbone", "img_neck")


def capture_modules(model: torch.nn.Module, targets: Sequence[str], **compile_options: Any) -> List[str]:
    """``model.<target>.compile(dynamic=False, **compile_options)`` for each target the model has;
    returns the names compiled."""
    captured = []
    for name in targets:
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            module.compile(dynamic=False, **compile_options)
            captured.append(name)
    return captured


class _GraphCaptureAdapter(Adapter):
    phase: ClassVar[Phase] = Phase.MODEL
    enabled_by_default: ClassVar[bool] = False

    def __init__(self, *, targets: Optional[List[str]] = None) -> None:
        self.targets = list(targets if targets is not None else DEFAULT_TARGETS)

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        if context.model is None:
            return False, "no model in the context"
        if context.exporting:
            return False, "the export traces the eager modules"
        if not any(isinstance(getattr(context.model, name, None), torch.nn.Module) for name in self.targets):
            return False, f"the model has none of {', '.join(self.targets)}"
        return True, ""

    def _capture(self, context: AdapterContext, described: str, **compile_options: Any) -> AdapterResult:
        captured = capture_modules(context.model, self.targets, **compile_options)
        return AdapterResult.applied(f"{', '.join(captured)} compiled ({described}; compiles on first call)")


def cpp_compiler() -> Tuple[Optional[str], str]:
    """(the C++ compiler inductor would use on the CPU, "") or (None, why there is none)."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        return get_cpp_compiler(), ""
    except Exception as error:  # inductor raises its own error types when the search finds nothing
        return None, f"{type(error).__name__}: {error}"


def _targets_field() -> Any:
    """The ``targets`` option every capture adapter has."""
    return Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="Detector modules to compile (static input shapes; the 3D head is never captured).",
    )


def _backend_field() -> Any:
    """The ``backend`` option of the ``torch.compile`` adapters."""
    return Field(
        "inductor",
        description="inductor generates kernels; aot_eager traces the same graphs and runs eager kernels.",
    )


class GraphCaptureParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile mode (inductor); reduce-overhead replays CUDA graphs on CUDA.",
    )
    backend: Literal["inductor", "aot_eager"] = _backend_field()
    targets: List[CaptureTarget] = _targets_field()


class GraphCapture(_GraphCaptureAdapter):
    """``torch.compile`` of the static-shape modules (image backbone and neck by default)."""

    name: ClassVar[str] = "graph_capture"
    devices: ClassVar[Tuple[str, ...]] = ("cuda", "cpu")

    def __init__(
        self, *, mode: str = "default", backend: str = "inductor", targets: Optional[List[str]] = None
    ) -> None:
        super().__init__(targets=targets)
        self.mode = mode
        self.backend = backend

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        ok, reason = super().precheck(context)
        if ok and self.backend == "inductor" and context.device == "cpu":
            compiler, why_not = cpp_compiler()
            if compiler is None:
                return False, (f"inductor on the CPU needs a C++ compiler ({why_not}); install g++ or set "
                               "CXX, or use backend: aot_eager")
        return ok, reason

    def apply(self, context: AdapterContext) -> AdapterResult:
        options: Dict[str, Any] = {"backend": self.backend}
        described = f"torch.compile backend={self.backend}"
        if self.backend == "inductor":
            options["mode"] = self.mode
            described += f", mode={self.mode}"
            if self.mode == "reduce-overhead":
                described += ", CUDA graphs" if context.device == "cuda" else ", no CUDA graphs on the CPU"
        return self._capture(context, described, **options)


class InferenceGraphCaptureParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    freezing: bool = Field(
        True,
        description="Compile the eval weights in as constants (inductor freezing: constant folding, oneDNN "
        "weight pre-packing on the CPU).",
    )
    backend: Literal["inductor", "aot_eager"] = _backend_field()
    targets: List[CaptureTarget] = _targets_field()


class InferenceGraphCapture(GraphCapture):
    """``torch.compile`` of the static-shape modules of a model in eval mode with its final weights
    (evaluation, ``streampetr infer``, benchmarks), after BatchNorm folding; never where the model is
    traced for export, whose graph must come from the eager modules."""

    name: ClassVar[str] = "inference_graph_capture"
    phase: ClassVar[Phase] = Phase.INFERENCE
    priority: ClassVar[int] = 200  # after the other inference adapters (BatchNorm folding): it compiles their result

    def __init__(self, *, freezing: bool = True, backend: str = "inductor", targets: Optional[List[str]] = None) -> None:
        super().__init__(backend=backend, targets=targets)
        self.freezing = freezing

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        if context.model is not None and context.model.training:
            return False, "the model is in training mode"
        return super().precheck(context)

    def apply(self, context: AdapterContext) -> AdapterResult:
        if self.backend != "inductor":
            return self._capture(context, f"torch.compile backend={self.backend}", backend=self.backend)
        # torch.compile takes either a mode or inductor options; freezing is an option.
        described = f"torch.compile backend=inductor, freezing {'on' if self.freezing else 'off'}"
        return self._capture(context, described, backend="inductor", options={"freezing": self.freezing})


class NpuGraphCaptureParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["npugraph_ex", "reduce-overhead", "max-autotune"] = Field(
        "npugraph_ex",
        description="torchair CompilerConfig.mode: npugraph_ex captures NPU graphs (reduce-overhead: its "
        "older, deprecated name), max-autotune compiles with the graph engine.",
    )
    targets: List[CaptureTarget] = _targets_field()


class NpuGraphCapture(_GraphCaptureAdapter):
    """The static-shape modules through torch_npu's graph mode (torchair backend of ``torch.compile``)."""

    name: ClassVar[str] = "npu_graph_capture"
    devices: ClassVar[Tuple[str, ...]] = ("npu",)

    def __init__(self, *, mode: str = "npugraph_ex", targets: Optional[List[str]] = None) -> None:
        super().__init__(targets=targets)
        self.mode = mode

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        if not torch_npu_installed():
            return False, "torch_npu is not installed"
        return super().precheck(context)

    def apply(self, context: AdapterContext) -> AdapterResult:
        import_torch_npu()  # registers torchair (bundled in torch_npu.dynamo) as an importable module
        torchair = importlib.import_module("torchair")
        config = torchair.CompilerConfig()
        config.mode = self.mode  # torchair raises ValueError for a mode this version does not know
        backend = torchair.get_npu_backend(compiler_config=config)
        return self._capture(context, f"torchair backend, mode={self.mode}", backend=backend)
