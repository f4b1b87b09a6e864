"""The batch's way through the SIMULATED host: collate, ``move_to_device``, FSDP2 input casts, forward.

Behaviours #9-#16 of the simulated host (numbered in its docstrings).
"""

import importlib

import pytest
import torch

from .harness import PACKAGE, TINY_RECIPE, tiny_recipe_overrides


def contract_batch(batch_size: int = 2, cameras: int = 3) -> dict:
    """A batch of the data contract with awkward values: float64 timestamps, ragged targets, strings."""
    gen = torch.Generator().manual_seed(0)
    boxes = [torch.randn(count, 9, generator=gen) for count in (3, 0, 5)[:batch_size]]
    return {
        "img": torch.randn(batch_size, cameras, 3, 32, 64, generator=gen),
        "lidar2img": torch.randn(batch_size, cameras, 4, 4, generator=gen) * 1000,
        "intrinsics": torch.randn(batch_size, cameras, 4, 4, generator=gen),
        "timestamp": torch.tensor([1533151603.547590, 1533151604.047601][:batch_size], dtype=torch.float64),
        "prev_exists": torch.tensor([0.0, 1.0][:batch_size]),
        "scene_token": ["a", "b"][:batch_size],
        "scene_idx": torch.tensor([4, 9][:batch_size]),
        "gt_bboxes_3d": boxes,
        "gt_labels_3d": [torch.randint(0, 10, (len(b),), generator=gen) for b in boxes],
        "gt_bboxes_2d": [
            [torch.rand(n, 4, generator=gen) for n in (2, 0, 1)[:cameras]] for _ in range(batch_size)
        ],
        "gt_labels_2d": [[torch.arange(n) for n in (2, 0, 1)[:cameras]] for _ in range(batch_size)],
    }


def assert_same_batch(decoded: dict, original: dict) -> None:
    for key, value in original.items():
        if isinstance(value, list) and value and isinstance(value[0], str):
            assert key not in decoded
        elif isinstance(value, torch.Tensor):
            assert decoded[key].dtype == value.dtype and torch.equal(decoded[key], value), key
        else:
            flat = [t for item in value for t in (item if isinstance(item, list) else [item])]
            got = [t for item in decoded[key] for t in (item if isinstance(item, list) else [item])]
            assert len(got) == len(flat) and all(
                torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, flat)
            )


@pytest.mark.parametrize("param_dtype", [None, "bf16", "fp16"])
def test_encoded_batch_survives_move_to_device_bit_for_bit(simulated_host, param_dtype):
    # 13: floating tensors would be cast (float64 timestamps included); dicts/str lists would be dropped.
    from mindspeed_mm.fsdp.utils.utils import get_dtype, move_to_device

    from streampetr_plugin.integrations.mindspeed_mm.codec import (
        PROBE_KEY,
        HostCastError,
        decode_batch,
        encode_batch,
    )

    original = contract_batch()
    encoded = encode_batch(original)
    moved = move_to_device(encoded, get_dtype(param_dtype) if param_dtype else None)
    assert set(moved) == set(encoded)  # nothing dropped
    assert all(torch.equal(moved[k], encoded[k]) for k in encoded if k != PROBE_KEY)
    if param_dtype is None:
        assert_same_batch(decode_batch(moved), original)
    else:
        with pytest.raises(HostCastError, match="param_dtype: null"):
            decode_batch(moved)


def test_encoded_batch_survives_the_fsdp2_forward_input_cast(simulated_host):
    # 14: FSDP2 casts every floating tensor in the (nested) forward inputs of each wrapped module.
    from mindspeed_mm.fsdp.distributed.parallelize import _cast_floating

    from streampetr_plugin.integrations.mindspeed_mm.codec import PROBE_KEY, decode_batch, encode_batch

    original = contract_batch()
    encoded = encode_batch(original)
    cast = _cast_floating(encoded, torch.bfloat16)
    cast[PROBE_KEY] = encoded[PROBE_KEY]
    assert_same_batch(decode_batch(cast), original)
    assert _cast_floating(original, torch.bfloat16)["timestamp"].dtype == torch.bfloat16  # unencoded: lost


def test_things_the_host_would_drop_are_refused_at_collate_time(simulated_host):
    # 13: a dict or a list of dicts would vanish silently inside the host.
    from streampetr_plugin.integrations.mindspeed_mm.codec import encode_batch

    with pytest.raises(TypeError, match="img_metas"):
        encode_batch({"img_metas": [{"pad_shape": (1, 2)}]})


def test_continuity_resets_rows_whose_next_frame_is_not_the_direct_successor(simulated_host):
    # 12 (cyclic iterator, epoch wrap) and shard boundaries / resume: only (same scene, next frame) continues.
    from streampetr_plugin.models.layers.stream_continuity import StreamContinuity

    continuity = StreamContinuity()
    steps = [([1, 2], [0, 5]), ([1, 2], [1, 6]), ([1, 3], [2, 7]), ([1, 3], [0, 8]), ([1, 3], [1, 9])]
    seen = [continuity.update(torch.tensor(s), torch.tensor(f)).tolist() for s, f in steps]
    assert seen == [[0, 0], [1, 1], [1, 0], [0, 1], [1, 1]]
    continuity.reset()
    assert continuity.update(torch.tensor([1, 3]), torch.tensor([2, 10])).tolist() == [0, 0]


def _tiny_model_args(synthetic_nuscenes):
    from mindspeed_mm.fsdp.params.argument import ModelArguments

    overrides = tiny_recipe_overrides(synthetic_nuscenes.root, synthetic_nuscenes.version)
    return ModelArguments(
        model_id="streampetr", streampetr={"recipe": str(TINY_RECIPE), "recipe_overrides": overrides}
    )


def _dataset(synthetic_nuscenes, *, micro_batch_size=1, world_size=None, epochs=1):
    from mindspeed_mm.fsdp.data import build_mm_dataset
    from mindspeed_mm.fsdp.params.argument import DataSetArguments

    overrides = tiny_recipe_overrides(synthetic_nuscenes.root, synthetic_nuscenes.version)
    block = {
        "recipe": str(TINY_RECIPE),
        "recipe_overrides": overrides,
        "micro_batch_size": micro_batch_size,
        "world_size": world_size,
        "epochs": epochs,
    }
    return build_mm_dataset(DataSetArguments(dataset_type="streampetr_nuscenes", streampetr=block))


def test_forward_takes_the_hosts_keywords_and_returns_loss_as_an_attribute(
    simulated_host, synthetic_nuscenes
):
    # 9, 15, 16: dataset called with dicts; model(**batch, use_cache=False); output.loss attribute;
    # no mtp_loss (would be added to the gradient) and no aux_loss.
    from mindspeed_mm.fsdp.models.modelhub import ModelHub
    from mindspeed_mm.fsdp.params.argument import TrainingArguments
    from mindspeed_mm.fsdp.utils.utils import move_to_device

    importlib.import_module(PACKAGE)
    dataset = _dataset(synthetic_nuscenes, micro_batch_size=2)
    batch = move_to_device(dataset.collate_fn([dataset[0], dataset[1]]), None)
    model = ModelHub.build(_tiny_model_args(synthetic_nuscenes), TrainingArguments()).train()
    output = model(**batch, use_cache=False, an_unknown_key=1)
    assert output.loss.dtype == torch.float32 and output.loss.dim() == 0 and output.loss.requires_grad
    assert torch.allclose(output.loss, sum(v for k, v in output.loss_terms.items() if "loss" in k))
    assert {"loss_cls", "loss_bbox", "dn_loss_cls", "enc_loss_cls"} <= set(output.loss_terms)
    assert getattr(output, "mtp_loss", None) is None and getattr(output, "aux_loss", None) is None
    output.loss.backward()
    assert model.img_backbone is not None and any(p.grad is not None for p in model.img_backbone.parameters())


def test_base_dataloader_mode_needs_a_registered_collator(simulated_host, synthetic_nuscenes):
    # 10: base mode ignores dataset.collate_fn and needs a collator id: sampler mode is required.
    from mindspeed_mm.fsdp.data import build_mm_dataloader

    importlib.import_module(PACKAGE)
    dataset = _dataset(synthetic_nuscenes)
    params = {"dataloader_mode": "base", "collate_param": {"collator_id": None, "pad_to_multiple_of": 8}}
    with pytest.raises(ValueError, match="collator"):
        build_mm_dataloader(dataset, params)


@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_sharded_unshuffled_host_sampler_replays_streampetr_order_on_every_rank(
    simulated_host, synthetic_nuscenes, micro_batch_size
):
    # 11: contiguous rank buckets of consecutive micro-batches (data_sharding: true, shuffle: false).
    from mindspeed_mm.fsdp.data.sampler import BaseRandomBatchSampler

    from streampetr_plugin.data.sampler import StreamingTrainSampler

    importlib.import_module(PACKAGE)
    world = 2
    dataset = _dataset(synthetic_nuscenes, micro_batch_size=micro_batch_size, world_size=world, epochs=2)
    for rank in range(world):
        sampler = BaseRandomBatchSampler(
            dataset,
            batch_size=micro_batch_size,
            num_replicas=world,
            rank=rank,
            shuffle=False,
            drop_last=True,
            data_sharding=True,
        )
        host = [[dataset.layout.place(i).frame for i in batch] for batch in sampler]
        ours = StreamingTrainSampler(
            dataset.frames.flag, batch_size=micro_batch_size, rank=rank, world_size=world, seed=dataset.seed
        )
        expected = [batch for _ in range(2) for batch in ours]
        assert host == expected and len(host) == 2 * len(ours)


@pytest.mark.parametrize("shuffle, data_sharding", [(False, False), (True, True)])
def test_interleaved_or_shuffled_host_sampling_is_refused(
    simulated_host, synthetic_nuscenes, monkeypatch, shuffle, data_sharding
):
    # 11: interleaved [r::W] indices or a permuted bucket would break every stream.
    from mindspeed_mm.fsdp.data.sampler import BaseRandomBatchSampler

    from streampetr_plugin.integrations.mindspeed_mm.dataset import StreamLayoutError

    importlib.import_module(PACKAGE)
    monkeypatch.setenv("RANK", "1")
    dataset = _dataset(synthetic_nuscenes, micro_batch_size=2, world_size=2)
    sampler = BaseRandomBatchSampler(
        dataset,
        batch_size=2,
        num_replicas=2,
        rank=1,
        shuffle=shuffle,
        drop_last=True,
        data_sharding=data_sharding,
    )
    with pytest.raises(StreamLayoutError, match="data_sharding: true"):
        for batch in sampler:
            dataset.check_placements([dataset.layout.place(i) for i in batch])


def test_loader_workers_draw_their_own_augmentations_despite_the_hosts_common_worker_seed(
    simulated_host, synthetic_nuscenes, monkeypatch
):
    # 12: the host seeds every worker of every rank with the same config seed (global RNGs only). Our
    # frames draw their augmentation from their place in the stream layout (rank, step, row), never from
    # a worker RNG: a frame met again later is augmented anew, and a host index gets the same draws in
    # whichever worker loads it (as streampetr-run's loader).
    from types import SimpleNamespace

    import streampetr_plugin.integrations.mindspeed_mm.dataset as dataset_module

    importlib.import_module(PACKAGE)
    dataset = _dataset(synthetic_nuscenes, epochs=2)
    first = dataset.layout.place(0)
    again = next(i for i in range(1, len(dataset)) if dataset.layout.place(i).frame == first.frame)
    geometry = []
    for worker, index in ((0, 0), (1, again), (1, 0)):
        info = SimpleNamespace(id=worker, seed=1000)  # the host's one worker seed
        monkeypatch.setattr(dataset_module, "get_worker_info", lambda info=info: info)
        geometry.append(dataset[index]["lidar2img"])
    assert not torch.equal(geometry[0], geometry[1])  # same frame, same worker seed, another draw
    assert torch.equal(geometry[0], geometry[2])  # same host index in another worker: the same draw
