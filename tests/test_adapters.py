"""Accelerator adapters: the runner's rules, device selection, and the NPU / CUDA / CPU adapters.

There is no Ascend hardware and no torch_npu / mindspeed here. The NPU tests run the real adapters
against a SIMULATION of those packages (``SimulatedAscend`` below): importable modules served by a
finder on ``sys.meta_path``, which record what the adapters do with them (the environment at the
moment ``torch_npu`` is imported, compile mode, device selection, fused-attention calls). The
simulated fused-attention kernel implements the documented semantics (BSND layout, boolean mask with
True = masked, explicit scale) so that our wrapper's layout and mask conversions are checked.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import logging
import math
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import threadpoolctl
import torch
from torch import nn

from streampetr_plugin import hookimpl
from streampetr_plugin.adapters import cpu as cpu_adapters
from streampetr_plugin.adapters import device as device_module
from streampetr_plugin.adapters.ascend import NPU_ENVIRONMENT, NpuFusedAdamW, NpuFusionAttention
from streampetr_plugin.adapters.base import (
    Adapter,
    AdapterContext,
    AdapterResult,
    AdapterRunner,
    Phase,
    Status,
)
from streampetr_plugin.adapters.device import DeviceError, candidate_device, confirm_device
from streampetr_plugin.config.loader import RecipeError, load_recipe
from streampetr_plugin.models.layers.multihead_attention import MultiheadAttentionCore
from streampetr_plugin.host import create_plugin_host
from streampetr_plugin.training.distributed import read_distributed_env
from streampetr_plugin.training.optimizers import AdamWParams, build_adamw, build_param_groups
from streampetr_plugin.training.trainer import Trainer
from tests import trainer_helpers
from tests.test_detector import tiny_batch, tiny_detector

# ----------------------------------------------------------------------------------- the simulation

# torch_npu 2.14's graph-mode API as read from its wheel (the file says how).
TORCH_NPU_GRAPH_API = json.loads(
    (Path(__file__).parent / "fixtures" / "torch_npu_2.14_graph_api.json").read_text(encoding="utf-8")
)


class SimulatedAscend(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """SIMULATION of ``torch_npu`` (and optionally ``mindspeed``) for adapter tests.

    Modules are created on import, so ``import torch_npu`` is an observable event: ``events`` gets
    ``("import torch_npu", {variable: value})`` with the NPU variables present at that moment. As in
    torch_npu 2.14, ``torchair`` becomes importable once ``torch_npu`` is imported; its graph backend
    records the graphs it is given (``captured_graphs``) and runs them eagerly.
    """

    def __init__(
        self, *, devices: int = 8, mindspeed: Optional[str] = None, fused_adamw: bool = True
    ) -> None:
        self.devices = devices
        self.mindspeed = mindspeed  # None: not installed; "works"; "needs_megatron": constructor raises
        self.fused_adamw = fused_adamw
        self.events: List[Any] = []
        self.attention_calls: List[Dict[str, Any]] = []
        self.captured_graphs: List[torch.fx.GraphModule] = []
        self.names = {"torch_npu", "torch_npu.npu", "torch_npu.optim"}
        if mindspeed is not None:
            self.names |= {"mindspeed", "mindspeed.optimizer", "mindspeed.optimizer.adamw"}

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        getattr(self, "_fill_" + module.__name__.replace(".", "_"))(module)

    def _fill_torch_npu(self, module: types.ModuleType) -> None:
        self.events.append(("import torch_npu", {k: os.environ.get(k) for k in NPU_ENVIRONMENT}))
        module.npu_fusion_attention = self._fusion_attention
        self.names.add("torchair")
        importlib.import_module("torch_npu.npu")
        importlib.import_module("torch_npu.optim")

    def _fill_torch_npu_npu(self, module: types.ModuleType) -> None:
        events = self.events
        module.config = types.SimpleNamespace(allow_internal_format=False)
        module.set_compile_mode = lambda jit_compile: events.append(("set_compile_mode", jit_compile))
        module.is_available = lambda: self.devices > 0
        module.device_count = lambda: self.devices
        module.set_device = lambda index: events.append(("set_device", index))
        module.get_device_name = lambda index: "Ascend910B (simulated)"
        sys.modules["torch_npu"].npu = module

    def _fill_torch_npu_optim(self, module: types.ModuleType) -> None:
        if self.fused_adamw:
            module.NpuFusedAdamW = type("NpuFusedAdamW", (torch.optim.AdamW,), {})
        sys.modules["torch_npu"].optim = module

    def _fill_torchair(self, module: types.ModuleType) -> None:
        simulation = self
        modes = TORCH_NPU_GRAPH_API["torchair.CompilerConfig.mode"]

        class CompilerConfig:
            """``mode`` takes the values the real CompilerConfig takes, else raises ValueError like it."""

            def __init__(self) -> None:
                self._mode = modes["default"]

            @property
            def mode(self) -> str:
                return self._mode

            @mode.setter
            def mode(self, value: str) -> None:
                if value not in modes["choices"]:
                    raise ValueError(f"Value {value!r} not in optional list {modes['choices']!r}")
                self._mode = value

        def get_npu_backend(*, compiler_config=None, custom_decompositions={}):  # the real signature
            simulation.events.append(("get_npu_backend", compiler_config.mode))

            def backend(graph_module, example_inputs):
                simulation.captured_graphs.append(graph_module)
                return graph_module.forward

            return backend

        module.CompilerConfig = CompilerConfig
        module.get_npu_backend = get_npu_backend

    def _fill_mindspeed(self, module: types.ModuleType) -> None:
        pass

    def _fill_mindspeed_optimizer(self, module: types.ModuleType) -> None:
        pass

    def _fill_mindspeed_optimizer_adamw(self, module: types.ModuleType) -> None:
        if self.mindspeed == "works":
            module.AdamW = type("AdamW", (torch.optim.AdamW,), {"__module__": "mindspeed.optimizer.adamw"})
            return

        class AdamW(torch.optim.AdamW):
            def __init__(self, *args, **kwargs):
                # What MindSpeed's AdamW does outside a Megatron job: it reads Megatron's global args.
                raise AssertionError("megatron args are not initialized")

        module.AdamW = AdamW

    def _fusion_attention(self, query, key, value, head_num, *, input_layout, atten_mask=None, scale=1.0,
                          keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647, sparse_mode=0):
        """The documented math: BSND inputs, atten_mask True = not attended, softmax(scale q k^T) v."""
        self.attention_calls.append(
            {"layout": input_layout, "heads": head_num, "scale": scale, "keep_prob": keep_prob,
             "mask": None if atten_mask is None else (atten_mask.dtype, tuple(atten_mask.shape)),
             "contiguous": all(t.is_contiguous() for t in (query, key, value)), "sparse_mode": sparse_mode}
        )
        assert input_layout == "BSND" and query.shape[2] == head_num
        q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))  # (B, N, S, D)
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale
        if atten_mask is not None:
            scores = scores.masked_fill(atten_mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3)  # (B, S, N, D)
        return out, None, None, None, 0, 0, 0


def _forget_simulated_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in ("torch_npu", "mindspeed", "torchair"):
            del sys.modules[name]


@pytest.fixture
def simulate_ascend(monkeypatch):
    """Install a SimulatedAscend; NPU variables start unset (restored afterwards)."""
    installed: List[SimulatedAscend] = []

    def install(**kwargs) -> SimulatedAscend:
        simulation = SimulatedAscend(**kwargs)
        _forget_simulated_modules()
        sys.meta_path.insert(0, simulation)
        installed.append(simulation)
        return simulation

    for key in NPU_ENVIRONMENT:
        monkeypatch.setenv(key, "placeholder")  # recorded, so that teardown removes what adapters set
        monkeypatch.delenv(key)
    yield install
    for simulation in installed:
        if simulation in sys.meta_path:
            sys.meta_path.remove(simulation)
    _forget_simulated_modules()


HOST = trainer_helpers.standin_host()


@pytest.fixture
def standin(tmp_path):
    return trainer_helpers.write_recipe(tmp_path)


def _context(device: str, recipe=None, model=None, **kwargs) -> AdapterContext:
    environ = kwargs.pop("environ", {})
    return AdapterContext(device=device, environ=environ, recipe=recipe, registries=HOST.registries,
                          model=model, **kwargs)


# ------------------------------------------------------------------------------------ runner rules


class _Toy(Adapter):
    def __init__(self, name, *, phase=Phase.MODEL, conflicts=(), devices=("cpu",), fail=False, priority=100,
                 default=True, log=None):
        self.name, self.phase, self.conflicts, self.devices = name, phase, tuple(conflicts), devices
        self.fail, self.priority, self.enabled_by_default, self.log = fail, priority, default, log

    def apply(self, context):
        if self.fail:
            raise RuntimeError("kernel missing")
        if self.log is not None:
            self.log.append(self.name)
        return AdapterResult.applied(f"{self.name} done")


def test_runner_orders_by_phase_then_priority_and_keeps_only_the_devices_adapters():
    log: List[str] = []
    adapters = [
        _Toy("late", phase=Phase.OPTIMIZER, log=log),
        _Toy("second", priority=20, log=log),
        _Toy("first", priority=10, log=log),
        _Toy("gpu_only", devices=("cuda",), log=log),
        _Toy("env", phase=Phase.ENVIRONMENT, log=log),
    ]
    runner = AdapterRunner(adapters, device="cpu")
    for phase in Phase:
        runner.run(phase, _context("cpu"))
    assert log == ["env", "first", "second", "late"]
    assert [r.name for r in runner.records] == log
    assert "gpu_only" not in runner.summary_table()


def test_conflicting_adapter_is_skipped_only_when_its_rival_applied():
    adapters = [_Toy("fast_kernel", priority=1), _Toy("other_kernel", priority=2, conflicts=["fast_kernel"])]
    runner = AdapterRunner(adapters, device="cpu")
    runner.run(Phase.MODEL, _context("cpu"))
    assert runner.status("fast_kernel") is Status.APPLIED
    record = runner.records[1]
    assert record.status is Status.SKIPPED and "conflicts with fast_kernel" in record.reason

    runner = AdapterRunner(adapters, device="cpu", enabled={"fast_kernel": False})
    runner.run(Phase.MODEL, _context("cpu"))
    assert runner.status("other_kernel") is Status.APPLIED
    assert "disabled by the recipe" in runner.records[0].reason


def test_failing_adapter_is_reported_and_the_rest_still_run(caplog):
    runner = AdapterRunner([_Toy("broken", priority=1, fail=True), _Toy("fine", priority=2)], device="cpu")
    with caplog.at_level(logging.WARNING):
        runner.run(Phase.MODEL, _context("cpu"))
    broken = runner.records[0]
    assert broken.status is Status.FAILED and "RuntimeError: kernel missing" in broken.reason
    assert runner.status("fine") is Status.APPLIED
    assert sum("broken" in r.getMessage() for r in caplog.records) == 1
    table = runner.summary_table("title")
    assert table.splitlines()[0] == "title"
    assert any(line.split()[:3] == ["model", "broken", "FAILED"] for line in table.splitlines())


def test_off_by_default_adapter_says_how_to_turn_it_on():
    runner = AdapterRunner([_Toy("opt_in", default=False)], device="cpu")
    runner.run(Phase.MODEL, _context("cpu"))
    assert runner.records[0].status is Status.SKIPPED
    assert "accelerator.adapters.opt_in.enabled: true" in runner.records[0].reason


def test_recipe_adapter_options_are_validated(standin):
    with pytest.raises(RecipeError, match="accelerator.adapters.npu_environment.extr.*unknown key"):
        load_recipe(standin, ["accelerator.adapters.npu_environment.extr={A: b}"], host=HOST)
    with pytest.raises(RecipeError, match="unknown adapter 'npu_fusion_atention'"):
        load_recipe(standin, ["accelerator.adapters.npu_fusion_atention.enabled=false"], host=HOST)


# -------------------------------------------------------------------------------- device selection


def test_auto_without_torch_npu_or_cuda_selects_the_cpu_and_says_why():
    if device_module.torch_npu_installed() or torch.cuda.is_available():
        pytest.skip("this machine has an accelerator runtime")
    kind, how = candidate_device("auto", hooks=HOST.hooks, environ={})
    assert kind == "cpu" and "no torch_npu" in how and "CUDA is not available" in how
    with pytest.raises(DeviceError, match="device 'npu'.*torch_npu is not installed"):
        confirm_device("npu", "accelerator.device")
    with pytest.raises(DeviceError, match="device 'cuda'.*CUDA is not available"):
        confirm_device("cuda", "accelerator.device")


def test_auto_checks_the_npu_first_and_falls_back_when_it_has_no_device(simulate_ascend):
    first = simulate_ascend()
    kind, how = candidate_device("auto", hooks=HOST.hooks, environ={})
    assert (kind, "torch_npu is installed" in how) == ("npu", True)
    assert "torch_npu" not in sys.modules  # the candidate is chosen without importing it
    assert confirm_device(kind, how)[0] == "npu"

    sys.meta_path.remove(first)
    simulate_ascend(devices=0)
    kind, how = confirm_device(*candidate_device("auto", hooks=HOST.hooks, environ={}))
    assert kind in ("cpu", "cuda") and "torch_npu found no NPU" in how


def test_select_accelerator_hook_overrides_the_recipe():
    class ForceCpu:
        @hookimpl
        def streampetr_select_accelerator(self, env):
            return "cpu" if env["requested"] == "cuda" else None

    host = create_plugin_host()
    host.register_plugin(ForceCpu(), name="force_cpu")
    chosen = candidate_device("cuda", hooks=host.hooks, environ={})
    assert chosen == ("cpu", "chosen by a plugin (streampetr_select_accelerator)")
    assert candidate_device("cpu", hooks=host.hooks, environ={})[1] == "accelerator.device"


# ------------------------------------------------------------------------------------ Ascend (simulated)


def _npu_trainer(recipe_path: Path, overrides=(), environ: Optional[Dict[str, str]] = None) -> Trainer:
    recipe = load_recipe(recipe_path, ["accelerator.device=npu", *overrides], host=HOST)
    trainer = Trainer(recipe, host=HOST)
    trainer.dist_env = read_distributed_env(environ or {})
    return trainer


def test_npu_environment_is_set_before_torch_npu_is_imported_and_keeps_user_values(
    simulate_ascend, standin, monkeypatch
):
    simulation = simulate_ascend(devices=8)
    monkeypatch.setenv("HCCL_CONNECT_TIMEOUT", "3600")
    monkeypatch.setenv("HCCL_EXEC_TIMEOUT", "placeholder")  # recorded, so that teardown removes it
    monkeypatch.delenv("HCCL_EXEC_TIMEOUT")
    extra = "accelerator.adapters.npu_environment.extra={HCCL_EXEC_TIMEOUT: '1800'}"
    trainer = _npu_trainer(standin, [extra])
    trainer._select_device()

    names = [event[0] for event in simulation.events]
    assert names == ["import torch_npu", "set_compile_mode", "set_device"]
    environment_at_import = simulation.events[0][1]
    expected = {**NPU_ENVIRONMENT, "HCCL_CONNECT_TIMEOUT": "3600"}
    assert environment_at_import == expected
    assert os.environ["HCCL_EXEC_TIMEOUT"] == "1800"
    assert simulation.events[1] == ("set_compile_mode", False)
    assert sys.modules["torch_npu"].npu.config.allow_internal_format is True
    assert (trainer.device.kind, trainer.device.index) == ("npu", 0)

    records = {r.name: r for r in trainer.adapters.records}
    assert records["npu_environment"].status is Status.APPLIED
    assert "kept the exported HCCL_CONNECT_TIMEOUT=3600" in records["npu_environment"].reason
    assert "TASK_QUEUE_ENABLE=2" in records["npu_environment"].reason
    assert records["npu_runtime"].status is Status.APPLIED


def test_local_rank_beyond_the_visible_npus_is_a_clear_error(simulate_ascend, standin):
    simulate_ascend(devices=2)
    trainer = _npu_trainer(
        standin,
        environ={"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
    )
    message = r"LOCAL_RANK=3 but only 2 NPU device\(s\) are visible .*nproc-per-node 2"
    with pytest.raises(DeviceError, match=message):
        trainer._select_device()


def _recipe_and_model(recipe_path: Path, overrides=()):
    recipe = load_recipe(recipe_path, list(overrides), host=HOST)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    return recipe, model


@pytest.mark.parametrize(
    "mindspeed, fused_adamw, status, reason_start, reason_parts",
    [
        ("works", True, Status.APPLIED, "mindspeed.optimizer.adamw.AdamW", []),
        (None, True, Status.APPLIED, "torch_npu.optim.NpuFusedAdamW",
         ["not used: mindspeed.optimizer.adamw.AdamW: ImportError: mindspeed is not installed"]),
        ("needs_megatron", False, Status.SKIPPED, "torch.optim.AdamW",
         ["AssertionError: megatron args are not initialized", "torch_npu.optim has no NpuFusedAdamW"]),
    ],
)
def test_npu_fused_adamw_falls_back_in_order(
    simulate_ascend, standin, mindspeed, fused_adamw, status, reason_start, reason_parts
):
    simulate_ascend(mindspeed=mindspeed, fused_adamw=fused_adamw)
    recipe, model = _recipe_and_model(standin)
    context = _context("npu", recipe, model)
    record = AdapterRunner([NpuFusedAdamW()], device="npu").run(Phase.OPTIMIZER, context)[0]
    assert record.status is status and record.reason.startswith(reason_start)
    for part in reason_parts:
        assert part in record.reason
    groups = build_param_groups(model, base_lr=1e-3, multipliers={})
    extra = {} if context.optimizer_class is None else {"optimizer_class": context.optimizer_class}
    optimizer = build_adamw(AdamWParams(lr=1e-3), param_groups=groups, **extra)
    built = type(optimizer)
    if status is Status.SKIPPED:
        assert built is torch.optim.AdamW
    else:
        assert reason_start.endswith(built.__name__) and built is not torch.optim.AdamW


def test_npu_fused_adamw_respects_a_forced_implementation(simulate_ascend, standin):
    simulate_ascend(mindspeed="works")
    recipe, model = _recipe_and_model(standin, ["optimization.optimizer.implementation=foreach"])
    context = _context("npu", recipe, model)
    record = AdapterRunner([NpuFusedAdamW()], device="npu").run(Phase.OPTIMIZER, context)[0]
    assert record.status is Status.SKIPPED and "implementation=foreach" in record.reason
    assert context.optimizer_class is None


def _run_fusion_attention(model: nn.Module):
    runner = AdapterRunner([NpuFusionAttention()], device="npu")
    return runner.run(Phase.MODEL, _context("npu", model=model))[0]


class _TwoAttentions(nn.Module):
    def __init__(self, embed_dims: int, num_heads: int) -> None:
        super().__init__()
        self.self_attn = MultiheadAttentionCore(embed_dims=embed_dims, num_heads=num_heads)
        self.cross_attn = MultiheadAttentionCore(embed_dims=embed_dims, num_heads=num_heads)


def test_npu_fusion_attention_is_registered_selected_and_matches_the_math_backend(simulate_ascend):
    simulation = simulate_ascend()
    torch.manual_seed(0)
    model = _TwoAttentions(embed_dims=32, num_heads=2).eval()  # head size 16, as the kernel needs
    query, key = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    mask = torch.rand(5, 7) > 0.6
    mask[:, 0] = False  # every query keeps at least one key
    expected = model.self_attn(query, key, key, attn_mask=mask)

    record = _run_fusion_attention(model)
    assert record.status is Status.APPLIED and record.reason.startswith("2 attention modules")
    assert "npu_fusion_attention" in HOST.registries.attention_backends
    assert model.self_attn.backend == model.cross_attn.backend == "npu_fusion_attention"

    fused = model.self_attn(query, key, key, attn_mask=mask)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    call = simulation.attention_calls[-1]
    assert call["layout"] == "BSND" and call["heads"] == 2 and call["contiguous"]
    assert call["mask"] == (torch.bool, (5, 7)) and call["keep_prob"] == 1.0
    assert math.isclose(call["scale"], 16 ** -0.5)

    model.train()
    model.self_attn.attn_drop = 0.1
    model.self_attn(query, key, key)
    assert math.isclose(simulation.attention_calls[-1]["keep_prob"], 0.9)


def test_npu_fusion_attention_skips_head_sizes_the_kernel_rejects(simulate_ascend):
    simulate_ascend()
    model = _TwoAttentions(embed_dims=16, num_heads=2)  # head size 8
    record = _run_fusion_attention(model)
    assert record.status is Status.SKIPPED and "multiples of 16" in record.reason
    assert model.self_attn.backend == "sdpa"


def test_npu_summary_table_lists_every_npu_adapter(simulate_ascend, standin):
    simulate_ascend(mindspeed=None)
    recipe = load_recipe(
        standin, ["accelerator.device=npu", "accelerator.adapters.gradient_checkpointing.enabled=true"],
        host=HOST,
    )
    model = _TwoAttentions(embed_dims=32, num_heads=2)
    runner = AdapterRunner.from_recipe(recipe, "npu", HOST.registries)
    context = _context("npu", recipe, model)
    for phase in Phase:
        runner.run(phase, context)
    statuses = {record.name: record.status for record in runner.records}
    assert statuses == {
        "npu_environment": Status.APPLIED,
        "npu_runtime": Status.APPLIED,
        "npu_fusion_attention": Status.APPLIED,
        "ddp_static_graph": Status.SKIPPED,  # one process
        "gradient_checkpointing": Status.SKIPPED,  # nothing checkpointable in this model
        "npu_fused_adamw": Status.APPLIED,
        "npu_graph_capture": Status.SKIPPED,  # off by default
        "fold_batchnorm": Status.SKIPPED,  # the model is in training mode
    }
    table = runner.summary_table()
    for name in statuses:
        assert name in table
    assert not any(name.startswith(("cuda_", "cpu_")) for name in statuses)


# ------------------------------------------------------------------------------------------- CUDA, CPU


def test_cuda_adapters_report_skipped_without_cuda(standin, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    recipe = load_recipe(
        standin, ["accelerator.device=cuda", "accelerator.adapters.cuda_channels_last.enabled=true"],
        host=HOST,
    )
    runner = AdapterRunner.from_recipe(recipe, "cuda", HOST.registries)
    context = _context("cuda", recipe, _TwoAttentions(32, 2), environ={})
    for phase in Phase:
        runner.run(phase, context)
    cuda_records = [r for r in runner.records if r.name.startswith("cuda_")]
    assert {r.name for r in cuda_records} == {
        "cuda_allocator", "cuda_tf32", "cuda_sdpa_kernels", "cuda_channels_last", "cuda_fused_adamw"
    }
    for record in cuda_records:
        assert (record.status, record.reason) == (Status.SKIPPED, "CUDA is not available")
    assert context.environ == {} and context.optimizer_options == {}


def _blas_pools():
    return [pool for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"]


def test_cpu_adapters_pick_threads_and_foreach_adamw(standin):
    recipe = load_recipe(standin, ["~accelerator.adapters.cpu_threads"], host=HOST)
    runner = AdapterRunner.from_recipe(recipe, "cpu", HOST.registries)
    threads = torch.get_num_threads()
    blas_threads = {pool["prefix"]: pool["num_threads"] for pool in _blas_pools()}
    try:
        exported = _context("cpu", recipe, environ={"OMP_NUM_THREADS": "1"})
        runner.run(Phase.RUNTIME, exported)
        assert runner.records[0].status is Status.SKIPPED and "OMP_NUM_THREADS=1" in runner.records[0].reason

        runner = AdapterRunner.from_recipe(recipe, "cpu", HOST.registries)
        shared = _context("cpu", recipe, environ={}, local_world_size=64)
        runner.run(Phase.RUNTIME, shared)
        assert runner.records[0].reason.startswith("torch.set_num_threads(1)")
        assert torch.get_num_threads() == 1
        # numpy's BLAS pool follows, so its idle workers do not spin beside torch's one thread
        assert blas_threads and all(pool["num_threads"] == 1 for pool in _blas_pools())
    finally:
        torch.set_num_threads(threads)
        threadpoolctl.threadpool_limits(limits=blas_threads)
    runner.run(Phase.OPTIMIZER, shared)
    assert shared.optimizer_options == {"implementation": "foreach"}


def test_cpu_glibc_malloc_keeps_a_large_block_on_the_heap():
    """The adapter's mallopt calls change where glibc puts a block it would map on its own (64 MiB is
    above every mmap threshold), observed through mallinfo2. In a child process: the setting is
    process-wide and cannot be undone."""
    libc = cpu_adapters.load_glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    script = trainer_helpers.python_script("""
        import ctypes, json
        from streampetr_plugin.adapters.base import AdapterContext
        from streampetr_plugin.adapters.cpu import CpuGlibcMalloc

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                "keepcost")]

        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = MallInfo2
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]

        def mapped_while_holding_64_mib():
            block = libc.malloc(64 << 20)
            mapped = libc.mallinfo2().hblkhd  # bytes in separately mapped blocks
            libc.free(block)
            return mapped

        before = mapped_while_holding_64_mib()
        result = CpuGlibcMalloc().apply(AdapterContext(device="cpu", environ={}))
        print(json.dumps([result.status.value, result.reason, before, mapped_while_holding_64_mib()]))
    """)
    completed = subprocess.run(
        script, env=trainer_helpers.subprocess_env(), capture_output=True, text=True, check=False, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    status, reason, mapped_before, mapped_after = json.loads(completed.stdout.splitlines()[-1])
    assert status == "APPLIED" and "mallopt(M_MMAP_MAX, 0)" in reason
    assert mapped_before >= 64 << 20 and mapped_after < 64 << 20


def test_cpu_glibc_malloc_is_skipped_without_glibc_or_when_tuned_by_the_environment(monkeypatch):
    exported = {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}
    runner = AdapterRunner([cpu_adapters.CpuGlibcMalloc()], device="cpu")
    runner.run(Phase.ENVIRONMENT, _context("cpu", environ=exported))
    record = runner.records[0]
    assert record.status is Status.SKIPPED and "kept the exported GLIBC_TUNABLES" in record.reason

    # SIMULATION of a C library that is not glibc (musl, say): no gnu_get_libc_version.
    not_glibc = types.SimpleNamespace(malloc=None, free=None)
    monkeypatch.setattr(cpu_adapters.ctypes, "CDLL", lambda name: not_glibc)
    runner = AdapterRunner([cpu_adapters.CpuGlibcMalloc()], device="cpu")
    runner.run(Phase.ENVIRONMENT, _context("cpu", environ={}))
    assert (runner.records[0].status, runner.records[0].reason) == (
        Status.SKIPPED, "not running on glibc (mallopt is glibc's)"
    )


# --------------------------------------------------------------------------------- inference phase


def test_cpu_channels_last_trains_the_same_model(standin):
    """The adapter changes the backbone's memory layout, not what it computes: two training steps of a
    channels-last model give the losses and gradients of the contiguous one (oneDNN sums in another
    order: float32 rounding only), and its backbone's activations are channels-last."""
    recipe = load_recipe(standin, ["accelerator.adapters.cpu_channels_last.enabled=true"], host=HOST)
    contiguous, channels_last = tiny_detector().train(), tiny_detector().train()
    runner = AdapterRunner.from_recipe(recipe, "cpu", HOST.registries)
    runner.run(Phase.MODEL, _context("cpu", recipe, channels_last))
    assert runner.status("cpu_channels_last") is Status.APPLIED
    activations = []
    channels_last.img_backbone.stem.register_forward_hook(lambda module, args, out: activations.append(out))

    for step in range(2):  # the second step reads the streaming memory the first one wrote
        batch = tiny_batch(step)
        results = []
        for model in (contiguous, channels_last):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # the same denoising noise in both
            losses = model(batch).losses
            sum(value for name, value in losses.items() if "loss" in name).backward()
            results.append((losses, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
        (expected_losses, expected_grads), (losses, grads) = results
        for name, value in expected_losses.items():
            torch.testing.assert_close(losses[name], value, rtol=1e-4, atol=1e-5, msg=name)
        assert grads.keys() == expected_grads.keys()
        # Each gradient sums many terms in another order: compare at the scale of all the gradients.
        scale = max(grad.abs().max().item() for grad in expected_grads.values())
        for name, grad in expected_grads.items():
            error = (grads[name] - grad).abs().max().item()
            assert error <= 1e-4 * scale, (name, error, scale)
    assert activations[-1].is_contiguous(memory_format=torch.channels_last)
    assert not activations[-1].is_contiguous()


def test_inference_adapters_fold_batchnorm_by_default_and_never_touch_a_training_model(standin):
    recipe = load_recipe(standin, ["accelerator.adapters.cpu_channels_last.enabled=true"], host=HOST)
    training = tiny_detector().train()
    runner = AdapterRunner.from_recipe(recipe, "cpu", HOST.registries)
    runner.run(Phase.INFERENCE, _context("cpu", recipe, training))
    statuses = {record.name: (record.status, record.reason) for record in runner.records}
    assert statuses["fold_batchnorm"] == (Status.SKIPPED, "the model is in training mode")
    assert any(isinstance(m, nn.BatchNorm2d) for m in training.modules())

    eager = tiny_detector().eval()
    served = tiny_detector().eval()
    runner = AdapterRunner.from_recipe(recipe, "cpu", HOST.registries)
    runner.run(Phase.INFERENCE, _context("cpu", recipe, served))
    assert [(r.name, r.status) for r in runner.records] == [
        ("fold_batchnorm", Status.APPLIED),
        ("inference_graph_capture", Status.SKIPPED),  # off by default
    ]
    runner.run(Phase.MODEL, _context("cpu", recipe, served))  # the layout is a model-phase adapter
    assert runner.status("cpu_channels_last") is Status.APPLIED
    assert not any(isinstance(m, nn.BatchNorm2d) for m in served.modules())
    assert served.img_backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, actual = eager(tiny_batch()), served(tiny_batch())
    torch.testing.assert_close(actual.all_cls_scores, expected.all_cls_scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(actual.all_bbox_preds, expected.all_bbox_preds, rtol=1e-4, atol=1e-5)
