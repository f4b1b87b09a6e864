"""Streaming samplers: coverage per epoch, temporal order, stream slots, resume, evaluation slices."""
from __future__ import annotations

import itertools
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from streampetr_plugin.data.dataset import sequence_group_flags
from streampetr_plugin.data.sampler import StreamingEvalSampler, StreamingTrainSampler

SCENE_LENGTHS = (5, 7, 4, 6, 3, 8, 5, 6, 9, 4)


def _num_sweeps(lengths=SCENE_LENGTHS):
    return [min(frame, 10) for length in lengths for frame in range(length)]


def test_group_flags_cut_scenes_like_the_reference():
    flags = sequence_group_flags(_num_sweeps((5, 4, 1)), seq_split_num=2)
    # ceil(5/2)=3 -> [3, 2]; 4 -> [2, 2]; a 1-frame scene stays one group.
    np.testing.assert_array_equal(flags, [0, 0, 0, 1, 1, 2, 2, 3, 3, 4])
    np.testing.assert_array_equal(sequence_group_flags(_num_sweeps((5, 4)), seq_split_num=1),
                                  [0] * 5 + [1] * 4)
    np.testing.assert_array_equal(sequence_group_flags(_num_sweeps((7,)), seq_split_num=3),
                                  [0, 0, 0, 1, 1, 1, 2])


def _run(flags, batch_size, world_size, iterations, seed=0):
    """Per global slot: list of (dataset index, epoch) it emitted."""
    streams = defaultdict(list)
    for rank in range(world_size):
        sampler = StreamingTrainSampler(flags, batch_size=batch_size, rank=rank, world_size=world_size,
                                        seed=seed)
        batches = itertools.chain.from_iterable(iter(sampler) for _ in range(iterations // len(sampler) + 1))
        for batch in itertools.islice(batches, iterations):
            for slot, index in enumerate(batch):
                streams[rank * batch_size + slot].append((index, sampler.slot_epochs[slot]))
    return streams


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_once_per_epoch(world_size):
    flags = sequence_group_flags(_num_sweeps(), seq_split_num=2)
    num_samples = len(flags)
    streams = _run(flags, batch_size=2, world_size=world_size, iterations=3 * num_samples)
    per_epoch = defaultdict(Counter)
    for stream in streams.values():
        for index, epoch in stream:
            per_epoch[epoch][index] += 1
    completed = min(stream[-1][1] for stream in streams.values())  # every slot has moved past earlier epochs
    assert completed >= 2
    for epoch in range(completed):
        assert per_epoch[epoch] == Counter(range(num_samples)), epoch


@pytest.mark.parametrize("world_size", [1, 3])
def test_slots_play_whole_groups_in_temporal_order(world_size):
    flags = sequence_group_flags(_num_sweeps(), seq_split_num=2)
    streams = _run(flags, batch_size=2, world_size=world_size, iterations=150)
    for stream in streams.values():
        indices = [index for index, _ in stream]
        for previous, current in zip(indices, indices[1:]):
            next_frame = current == previous + 1 and flags[current] == flags[previous]
            # Otherwise a group starts at its first frame after the previous one was played to its end.
            starts_group = current == 0 or flags[current - 1] != flags[current]
            ended_group = previous + 1 == len(flags) or flags[previous + 1] != flags[previous]
            assert next_frame or (starts_group and ended_group), (previous, current)


def test_slot_streams_follow_the_reference_permutation_stream():
    """Global slot g plays the groups at stream positions g, g + G, ... of randperm draws from seed."""
    flags = sequence_group_flags(_num_sweeps(), seq_split_num=2)
    num_groups = flags.max() + 1
    generator = torch.Generator()
    generator.manual_seed(7)
    stream = np.concatenate([torch.randperm(num_groups, generator=generator).numpy() for _ in range(12)])
    global_batch = 4
    streams = _run(flags, batch_size=2, world_size=2, iterations=100, seed=7)
    for slot, emitted in streams.items():
        played = [flags[index] for index, _ in emitted if index == 0 or flags[index - 1] != flags[index]]
        np.testing.assert_array_equal(played, stream[slot::global_batch][:len(played)])


def test_state_dict_resumes_the_same_streams_on_every_rank():
    flags = sequence_group_flags(_num_sweeps(), seq_split_num=2)
    for rank in range(2):
        reference = StreamingTrainSampler(flags, batch_size=2, rank=rank, world_size=2, seed=3)
        batches = list(itertools.islice(itertools.chain(iter(reference), iter(reference)), 20))
        resumed = StreamingTrainSampler(flags, batch_size=2, rank=rank, world_size=2, seed=3)
        # Any rank restores from the state another rank saved after 9 iterations.
        saved = StreamingTrainSampler(flags, batch_size=2, rank=1 - rank, world_size=2, seed=3)
        list(itertools.islice(iter(saved), 9))
        resumed.load_state_dict(saved.state_dict())
        assert resumed.iteration == 9
        continued = list(itertools.islice(itertools.chain(iter(resumed), iter(resumed)), 11))
        assert continued == batches[9:]


def test_state_dict_rejects_another_configuration():
    flags = sequence_group_flags(_num_sweeps(), seq_split_num=2)
    state = StreamingTrainSampler(flags, batch_size=2, world_size=1, seed=0).state_dict()
    with pytest.raises(ValueError, match="global_batch_size"):
        StreamingTrainSampler(flags, batch_size=2, world_size=2, seed=0).load_state_dict(state)


def test_too_few_groups_for_the_slots_is_an_error():
    with pytest.raises(ValueError, match="sequence groups"):
        StreamingTrainSampler(sequence_group_flags(_num_sweeps((4, 4)), 1), batch_size=2, world_size=2)


def test_epoch_length_is_the_reference_iteration_count():
    flags = sequence_group_flags(_num_sweeps(), seq_split_num=2)
    sampler = StreamingTrainSampler(flags, batch_size=2, rank=0, world_size=3)
    assert len(sampler) == len(flags) // 6
    assert len(list(sampler)) == len(sampler) and sampler.epoch == 1


@pytest.mark.parametrize("world_size,batch_size", [(1, 1), (2, 1), (3, 1), (3, 2)])
def test_eval_slices_are_contiguous_and_cover_everything(world_size, batch_size):
    num_samples = 23
    rows = []
    for rank in range(world_size):
        sampler = StreamingEvalSampler(num_samples, batch_size=batch_size, rank=rank, world_size=world_size)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        rows += [[batch[b] for batch in batches] for b in range(batch_size)]
    flat = [index for row in rows for index in row]
    assert set(flat) == set(range(num_samples))
    streams = world_size * batch_size
    total = -(-num_samples // streams) * streams
    # Padding repeats the first indices (reference DistributedSampler), everything else exactly once.
    assert flat == (list(range(num_samples)) * 2)[:total]
    for row in rows:
        assert len(row) == total // streams


def test_eval_sampler_resumes_mid_pass():
    sampler = StreamingEvalSampler(10, rank=1, world_size=2)
    first = list(itertools.islice(iter(sampler), 2))
    state = sampler.state_dict()
    resumed = StreamingEvalSampler(10, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert first + list(resumed) == [[5], [6], [7], [8], [9]]
    assert list(resumed) == [[5], [6], [7], [8], [9]]  # the next pass starts over
