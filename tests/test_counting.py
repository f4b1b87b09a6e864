"""The bench's counter of host syncs, ATen ops and kernel launches, on functions whose counts are known."""
import numpy as np
import pytest
import torch

from streampetr_plugin.adapters.device import DeviceHandle
from streampetr_plugin.bench.counting import HostSyncCounter, count_dispatch, count_ops
from streampetr_plugin.bench.synthetic_batch import SyntheticStreams, stream_shape
from streampetr_plugin.bench.train_step import BenchRun
from streampetr_plugin import load_recipe
from streampetr_plugin.host import create_plugin_host
from tests.tiny_demo import TINY_MODEL

# What training may ask of the host per step: the matchings' one copy, the one read of loss and
# gradient norm, and slack for the fp16 loss scaler's overflow check on an accelerator.
HOST_SYNC_TARGET = 4


def three_scalar_reads_and_one_nonzero(x: torch.Tensor) -> None:
    """Exactly four reads of the device tensor ``x``, and host work that an accelerator does not wait for."""
    x[0].item()
    float(x[1])
    bool(x[2] > 0)
    torch.nonzero(x > 0)
    torch.randint(0, 5, (1,)).item()  # a host tensor (no device given)
    torch.zeros(3).nonzero()
    torch.from_numpy(np.arange(4)).tolist()


def count(run, device_kind="cpu"):
    with HostSyncCounter(device_kind).watch() as result:
        run()
    return result


def test_counts_exactly_the_reads_of_device_tensors():
    x = torch.randn(8)  # made before counting: an input, on the device in training
    result = count(lambda: three_scalar_reads_and_one_nonzero(x))
    assert result.total == 4
    assert sum(result.sites.values()) == 4
    assert sum(n for site, n in result.sites.items() if site.startswith("_local_scalar_dense")) == 3
    assert sum(n for site, n in result.sites.items() if site.startswith("nonzero")) == 1
    assert all("test_counting.py" in site for site in result.sites)  # the caller's line, not torch's


def test_copies_to_the_host_count_once_and_their_results_stay_on_the_host():
    x = torch.randn(5)

    def run():
        on_host = x.cpu()  # one copy
        on_host.numpy()  # already on the host: free
        on_host[on_host > 0]
        x.tolist()  # one copy
        x[x > 0]  # boolean indexing of a device tensor: one read of the mask
        torch.zeros(3, device=x.device).nonzero()  # made on the device: one read
        x.to(x.device).sum()  # stays on the device: free

    assert count(run).total == 4


def test_tensors_made_in_the_step_without_a_device_are_host_tensors():
    assert count(lambda: torch.randn(8)[0].item()).total == 0
    assert count(lambda: torch.randn(8, device=torch.device("cpu"))[0].item()).total == 1


def test_host_tensors_moved_to_the_device_are_device_tensors():
    def run():
        moved = torch.arange(4).to(torch.device("cpu"))  # like .to(device): the training device
        moved.nonzero()

    assert count(run).total == 1


def test_blocking_uploads_are_counted_apart_and_non_blocking_ones_not_at_all():
    like = torch.ones(2)
    device = torch.device("cpu")  # stands for the training device

    def run():
        torch.arange(3).to(device)  # blocking: one
        torch.arange(3).to(device, non_blocking=True)  # staged: none
        torch.tensor([1.0, 2.0], device=device)  # Python data copied to the device: one
        like.new_tensor([1.0, 2.0])  # likewise: one
        like.new_full((2,), 3.0)  # filled on the device: none
        like.to(device)  # already there: none

    result = count(run)
    assert (result.uploads, result.total) == (3, 0)
    assert sum(result.upload_sites.values()) == 3


def test_optimiser_step_counters_made_on_the_host_are_not_syncs():
    """AdamW keeps its step counters on the host and reads them every step: no sync on an accelerator.
    The counter must see them being made (the first watched step) to know."""
    parameter = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3, foreach=True)
    counter = HostSyncCounter("cpu")
    totals = []
    for _ in range(3):
        parameter.grad = torch.randn(4)
        with counter.watch() as result:
            optimizer.step()
        totals.append(result.total)
    assert totals == [0, 0, 0]


def test_ops_are_the_top_level_aten_ops():
    x = torch.randn(4, 4)
    ops, launches = count_ops(lambda: torch.relu((x + 1) * 2), "cpu")
    assert ops == 3  # add, mul, relu; their inner calls are not counted again
    assert launches is None  # no kernels on the CPU
    ops, _ = count_ops(lambda: torch.nn.functional.linear(x, x).sum(), "cpu")
    assert ops == 2


def test_count_dispatch_averages_per_step_after_the_priming_step():
    calls = []

    def step(x):
        calls.append(x)
        x[0].item()
        if len(calls) == 1:  # the priming step is not counted
            x[1].item()
        return x * 2

    counts = count_dispatch(step, lambda i: torch.full((3,), float(i)), first=0, steps=2, device_kind="cpu")
    assert counts.host_syncs == 1.0
    assert counts.ops == 3  # select, item, mul
    assert [float(x[0]) for x in calls] == [0.0, 1.0, 2.0, 3.0, 4.0]  # 1 priming, 2 counted, 2 profiled


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_training_step_of_a_tiny_detector_meets_the_host_sync_target():
    recipe = load_recipe("demo_cpu", [*TINY_MODEL, "data.train.final_dim=[64,160]", "accelerator.device=cpu",
                                      "accelerator.adapters.cpu_threads.num_threads=1"])
    device = DeviceHandle("cpu")
    run = BenchRun(recipe, device, create_plugin_host())
    run.model.train()
    streams = SyntheticStreams(stream_shape(recipe, training=True), seed=0)
    counts = count_dispatch(run.train_step, lambda i: streams.frame(i, device.torch_device), first=0, steps=2,
                            device_kind="cpu")
    assert counts.host_syncs <= HOST_SYNC_TARGET, counts.sync_sites
    assert counts.blocking_uploads == 0, counts.upload_sites
    # The one copy of both heads' matching costs is among them; nothing from the losses.
    assert sum(n for site, n in counts.sync_sites.items() if "assigners" in site) == 1
    assert not any("losses" in site for site in counts.sync_sites)
