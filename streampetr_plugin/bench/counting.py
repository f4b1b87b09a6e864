"""What one training step or inference frame asks of the host: device-to-host reads, ATen ops, kernels.

* **Host syncs** are reads that make the host wait for the device: a scalar read
  (``aten::_local_scalar_dense``, i.e. ``item()``, ``float()``, ``bool()`` of a tensor), an op whose
  output size depends on the data (``nonzero``, ``unique``, ``masked_select``, boolean indexing,
  ``repeat_interleave`` without ``output_size``, ``equal``), and a copy of a device tensor to the host
  (``cpu()``, ``to("cpu")``, ``tolist()``, ``numpy()``). They are seen where PyTorch dispatches them
  (a ``TorchDispatchMode``, with a ``TorchFunctionMode`` for the methods that leave torch), so that
  each read is judged by the tensor it reads:

  - on an accelerator, a read syncs when its tensor lives on the accelerator;
  - on the CPU nothing syncs, so the counter emulates the placement training uses: every tensor is
    taken to live on the device except those the code creates on the host (a factory call without a
    ``device`` argument, e.g. ``torch.randint(..., generator=g)`` or ``torch.zeros(n)``, a tensor made
    from Python or NumPy data, the result of a host read) and what is computed from host tensors only.
    A read of such a host tensor does not sync on an accelerator either and is not counted.

* **Blocking uploads** are host-to-device copies that wait for the device: CUDA copies pageable host
  memory with ``non_blocking=False`` through a stream synchronisation, so each such ``to(device)``,
  ``torch.tensor(data, device=...)`` or ``new_tensor(data)`` stalls the host like a read (with
  ``non_blocking=True`` the driver stages the data and returns at once). Counted like the syncs,
  emulated the same way on the CPU; kept apart, since they are not reads.
* **Ops** are the top-level ATen ops ``torch.profiler`` records (an ``aten::`` event whose parents are
  not ATen ops): what the host dispatches, forward and backward, whatever the device.
* **Kernel launches** (CUDA) are the runtime's launch calls in the same profile; on other devices
  they are not counted (None).
"""
from __future__ import annotations

import collections
import contextlib
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

# Ops whose result the host must wait for (the output's size or value is read back).
DATA_DEPENDENT_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten.repeat_interleave.Tensor,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
LIFT_OPS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
# Tensor methods that hand a tensor's data to the host (seen at the Python level on the CPU, where
# they dispatch no copy).
HOST_METHODS = {"cpu", "numpy", "tolist", "__array__"}
DATA_FACTORIES = {"tensor", "as_tensor"}  # factories that copy Python or NumPy data
FACTORY_FUNCTIONS = {
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "range", "linspace", "logspace",
    "eye", "rand", "randn", "randint", "randperm", "normal", "scalar_tensor",
}
KERNEL_LAUNCH_CALLS = (
    "cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel",
)
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
TORCH_ROOT = Path(torch.__file__).resolve().parent


@dataclass
class SyncCount:
    """Host syncs of one call: ``total`` and, per op and call site (``op at file:line``), how many;
    ``uploads`` and ``upload_sites`` likewise for the blocking host-to-device copies."""

    total: int = 0
    sites: Dict[str, int] = field(default_factory=dict)
    uploads: int = 0
    upload_sites: Dict[str, int] = field(default_factory=dict)


@dataclass
class DispatchCounts:
    """Per step: ``host_syncs``, ``blocking_uploads``, ``ops`` and ``kernel_launches`` (None off CUDA),
    with the sites of the syncs and of the uploads."""

    host_syncs: float
    blocking_uploads: float
    ops: float
    kernel_launches: Optional[float]
    sync_sites: Dict[str, float]
    upload_sites: Dict[str, float]


def _call_site() -> str:
    """``file:line`` of the innermost frame outside torch and this module (paths inside this package
    relative to its parent)."""
    here = Path(__file__).resolve()
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path == here or TORCH_ROOT in path.parents:
            continue
        where = path.relative_to(PACKAGE_ROOT.parent) if PACKAGE_ROOT in path.parents else path
        return f"{where}:{frame.lineno}"
    return "?"


class _Placement:
    """Where each tensor lives in training: its own device or, emulated on the CPU, the device unless
    the code made it on the host (kept across steps, so that host state such as an optimiser's step
    counters stays on the host)."""

    def __init__(self, emulate: bool) -> None:
        self.emulate = emulate
        self.host = WeakIdKeyDictionary()
        self.factory = threading.local()  # .on_host: inside a factory call without (False: with) a device

    def on_device(self, tensor: torch.Tensor) -> bool:
        if not self.emulate:
            return tensor.device.type != "cpu"
        return tensor not in self.host

    def set_host(self, value: Any, on_host: bool) -> None:
        for leaf in tree_leaves(value):
            if not isinstance(leaf, torch.Tensor):
                continue
            if on_host:
                self.host[leaf] = True
            else:
                self.host.pop(leaf, None)


class _SyncDispatch(TorchDispatchMode):
    """Counts the syncing ops into ``count``; emulating, also places every result."""

    def __init__(self, placement: _Placement) -> None:
        super().__init__()
        self.placement = placement
        self.count = SyncCount()

    def _syncs(self, func: Any, args: tuple, kwargs: dict, inputs: list) -> bool:
        placement = self.placement
        if not any(placement.on_device(t) for t in inputs):
            return False
        if func in DATA_DEPENDENT_OPS:
            return True
        if func in INDEX_OPS:  # a boolean mask as index: its positives are counted on the host
            return any(
                index is not None and index.dtype in (torch.bool, torch.uint8) and placement.on_device(index)
                for index in args[1]
            )
        if placement.emulate:  # a copy to the CPU dispatches nothing on the CPU: _SyncFunctions sees it
            return False
        source, target = _copy_ends(func, args, kwargs)
        return source is not None and source.type != "cpu" and target.type == "cpu"

    def _uploads(self, func: Any, args: tuple, kwargs: dict) -> bool:
        if self.placement.emulate:  # seen by _SyncFunctions
            return False
        source, target = _copy_ends(func, args, kwargs)
        if func is aten.copy_.default:
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        else:
            non_blocking = kwargs.get("non_blocking", False)
        return source is not None and source.type == "cpu" and target.type != "cpu" and not non_blocking

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None
    ) -> Any:
        kwargs = kwargs or {}
        inputs = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        if self._syncs(func, args, kwargs, inputs):
            self.record(func)
        elif self._uploads(func, args, kwargs):
            self.record(func, upload=True)
        out = func(*args, **kwargs)
        placement = self.placement
        if placement.emulate:
            # None: not inside a factory call (e.g. a composite op's own buffers, made on the device).
            made_on_host = getattr(placement.factory, "on_host", None)
            if func in LIFT_OPS:  # Python or NumPy data: on the host unless a device was asked for
                placement.set_host(out, made_on_host is not False)
            elif inputs:
                placement.set_host(out, not any(placement.on_device(t) for t in inputs))
            else:
                placement.set_host(out, made_on_host is True)
        return out

    def record(self, func: Any, *, upload: bool = False) -> None:
        count = self.count
        name = getattr(func, "__name__", str(func)).split(".")[0]
        site = f"{name} at {_call_site()}"
        sites = count.upload_sites if upload else count.sites
        sites[site] = sites.get(site, 0) + 1
        if upload:
            count.uploads += 1
        else:
            count.total += 1


def _copy_ends(func: Any, args: tuple, kwargs: dict) -> Tuple[Optional[torch.device], Optional[torch.device]]:
    """(source, destination) devices of a copy op, else (None, None)."""
    if func is aten._to_copy.default:
        return args[0].device, torch.device(kwargs.get("device") or args[0].device)
    if func is aten.copy_.default:
        return args[1].device, args[0].device
    return None, None


class _SyncFunctions(TorchFunctionMode):
    """Emulating on the CPU: what dispatches no copy there. ``cpu()``, ``numpy()``, ``tolist()`` of a
    device tensor are host copies; ``to(device)`` puts a tensor on the training device (code that
    means the host writes ``cpu()``), an upload unless ``non_blocking``, as are Python data made into a
    device tensor (``torch.tensor(data, device=...)``, ``new_tensor(data)``); a factory call without a
    ``device`` makes a host tensor."""

    def __init__(self, dispatch: _SyncDispatch) -> None:
        super().__init__()
        self.dispatch = dispatch

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        placement = self.dispatch.placement
        if name in FACTORY_FUNCTIONS and getattr(func, "__module__", None) == "torch":
            on_host = _names_host(kwargs.get("device"))
            if name in DATA_FACTORIES and not on_host and args and not isinstance(args[0], torch.Tensor):
                self.dispatch.record(func, upload=True)
            previous = getattr(placement.factory, "on_host", None)
            placement.factory.on_host = on_host
            try:
                return func(*args, **kwargs)
            finally:
                placement.factory.on_host = previous
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name == "new_tensor" and source is not None and placement.on_device(source):
            self.dispatch.record(func, upload=True)
        target = _to_target(args[1:], kwargs) if name == "to" else None
        to_host = name in HOST_METHODS or (target is not None and _names_host(target))
        if source is None or (target is None and not to_host):
            return func(*args, **kwargs)
        if to_host and placement.on_device(source):
            self.dispatch.record(func)
        elif not to_host and not placement.on_device(source) and not kwargs.get("non_blocking"):
            self.dispatch.record(func, upload=True)
        out = func(*args, **kwargs)
        if out is source:  # on the CPU this is the tensor itself: hand back an alias placed anew
            out = source.view_as(source)
        placement.set_host(out, to_host)
        return out


_NO_DEVICE = object()


def _to_target(args: tuple, kwargs: dict) -> Any:
    """The device a ``Tensor.to`` call names (a tensor stands for its device), else None."""
    for arg in (*args, kwargs.get("device", _NO_DEVICE)):
        if isinstance(arg, torch.Tensor):
            return arg.device
        if isinstance(arg, (str, torch.device)):
            return arg
    return None


def _names_host(device: Any) -> bool:
    """Emulating, the host is named by no device or by the string ``"cpu"``; a ``torch.device`` (the
    model's, ``like.device``) stands for the training device."""
    return device is None or (isinstance(device, str) and device.startswith("cpu"))


class HostSyncCounter:
    """Counts host syncs of the code run inside :meth:`watch` (see the module docstring).

    ``device_kind`` is the training device; ``cpu`` emulates an accelerator's placement. Use one
    counter for consecutive steps: the first watched step places the state it creates (optimiser step
    counters on the host, the streaming memory on the device) for the steps after it.
    """

    def __init__(self, device_kind: str) -> None:
        self.placement = _Placement(emulate=device_kind == "cpu")

    @contextlib.contextmanager
    def watch(self) -> Iterator[SyncCount]:
        dispatch = _SyncDispatch(self.placement)
        with contextlib.ExitStack() as stack:
            if self.placement.emulate:
                stack.enter_context(_SyncFunctions(dispatch))
            stack.enter_context(dispatch)
            yield dispatch.count


def count_ops(run: Callable[[], Any], device_kind: str) -> Tuple[int, Optional[int]]:
    """(top-level ATen ops, CUDA kernel launches or None) of ``run()`` under ``torch.profiler``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_kind == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    events = prof.events()
    ops = 0
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        ops += parent is None
    launches = None
    if device_kind == "cuda":
        launches = sum(1 for event in events if event.name.startswith(KERNEL_LAUNCH_CALLS))
    return ops, launches


def count_dispatch(
    step: Callable[[Any], Any],
    prepare: Callable[[int], Any],
    *,
    first: int,
    steps: int,
    device_kind: str,
    prime: int = 1,
) -> DispatchCounts:
    """Mean host syncs, ops and kernel launches per call of ``step(prepare(i))`` (inputs are built
    outside the count). From ``i = first``: ``prime`` watched steps that are not counted (they place
    the state that later steps read), ``steps`` counted for the syncs, then ``steps`` profiled."""
    counter = HostSyncCounter(device_kind)
    sites: Dict[str, int] = collections.Counter()
    upload_sites: Dict[str, int] = collections.Counter()
    index = first
    for number in range(prime + steps):
        inputs = prepare(index)
        with counter.watch() as count:
            step(inputs)
        index += 1
        if number >= prime:
            sites.update(count.sites)
            upload_sites.update(count.upload_sites)
    ops, launches = 0, None
    for _ in range(steps):
        inputs = prepare(index)
        step_ops, step_launches = count_ops(lambda: step(inputs), device_kind)
        index += 1
        ops += step_ops
        if step_launches is not None:
            launches = (launches or 0) + step_launches
    return DispatchCounts(
        host_syncs=sum(sites.values()) / steps,
        blocking_uploads=sum(upload_sites.values()) / steps,
        ops=ops / steps,
        kernel_launches=None if launches is None else launches / steps,
        sync_sites={site: number / steps for site, number in sites.most_common()},
        upload_sites={site: number / steps for site, number in upload_sites.most_common()},
    )
