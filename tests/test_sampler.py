"""The device-resident episode sampler: shapes, labels, disjointness, rotations, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from conftest import cuda_generator_state
from fewshot.data.base import DataError, SplitBank
from fewshot.data.sampler import EpisodeSampler, fixed_episodes

CLASSES, PER_CLASS, SIZE = 30, 20, 6


def coded_bank(rotate: bool = False) -> SplitBank:
    """Every image carries its (class, index) in two pixels, so we can read back what was drawn."""
    images = torch.zeros(CLASSES, PER_CLASS, 1, SIZE, SIZE, dtype=torch.uint8)
    images[:, :, 0, 0, 0] = torch.arange(CLASSES).view(-1, 1) + 1
    images[:, :, 0, 0, 1] = torch.arange(PER_CLASS).view(1, -1) + 1
    return SplitBank(images, [f"c{i}" for i in range(CLASSES)], rotate=rotate)


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 1, S, S) float in [0, 1] -> class ids, image ids."""
    raw = (x * 255).round().long()
    return raw[..., 0, 0, 0] - 1, raw[..., 0, 0, 1] - 1


def test_shapes_and_dtypes():
    s = EpisodeSampler(coded_bank(), ways=5, shots=2, queries=3, seed=0)
    ep = s.sample(7)
    assert ep.support_x.shape == (7, 10, 1, SIZE, SIZE) and ep.query_x.shape == (7, 15, 1, SIZE, SIZE)
    assert ep.support_y.shape == (7, 10) and ep.query_y.shape == (7, 15)
    assert ep.support_x.dtype == torch.float32 and ep.support_y.dtype == torch.int64
    assert 0.0 <= ep.support_x.min() and ep.support_x.max() <= 1.0


def test_labels_balanced_and_consistent_with_classes():
    s = EpisodeSampler(coded_bank(), ways=5, shots=2, queries=3, seed=1)
    ep = s.sample(16)
    for t in range(16):
        assert torch.bincount(ep.support_y[t], minlength=5).tolist() == [2] * 5
        assert torch.bincount(ep.query_y[t], minlength=5).tolist() == [3] * 5
        s_cls, _ = decode(ep.support_x[t])
        q_cls, _ = decode(ep.query_x[t])
        # One label <-> one class, the same in support and query, and `ways` distinct classes per task.
        mapping = {int(y): int(c) for y, c in zip(ep.support_y[t], s_cls)}
        assert len(set(mapping.values())) == 5
        assert all(mapping[int(y)] == int(c) for y, c in zip(ep.query_y[t], q_cls))


def test_label_order_is_random():
    """Label 0 is not always the smallest class id: the class order is shuffled per task."""
    ep = EpisodeSampler(coded_bank(), ways=5, shots=1, queries=1, seed=2).sample(50)
    cls, _ = decode(ep.support_x)  # (T, 5), support ordered by label
    assert not bool((cls[:, 1:] > cls[:, :-1]).all())


def test_support_and_query_are_disjoint_images():
    ep = EpisodeSampler(coded_bank(), ways=5, shots=5, queries=15, seed=3).sample(20)
    for t in range(20):
        s = set(zip(*(v.tolist() for v in decode(ep.support_x[t]))))
        q = set(zip(*(v.tolist() for v in decode(ep.query_x[t]))))
        assert len(s) == 25 and len(q) == 75 and not (s & q)


def test_same_seed_same_episodes_different_seed_different():
    a = EpisodeSampler(coded_bank(), 5, 1, 5, seed=7).sample(4)
    b = EpisodeSampler(coded_bank(), 5, 1, 5, seed=7).sample(4)
    c = EpisodeSampler(coded_bank(), 5, 1, 5, seed=8).sample(4)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.support_x, c.support_x)


def test_state_dict_resumes_the_stream():
    s = EpisodeSampler(coded_bank(), 5, 1, 5, seed=7)
    s.sample(3)
    state = s.state_dict()
    expected = s.sample(3)
    s.sample(5)
    assert s.load_state_dict(state) is True
    assert torch.equal(s.sample(3).support_x, expected.support_x)


def test_a_stream_from_another_kind_of_device_goes_on_from_a_seed_it_gives(caplog):
    """A GPU run resumed on a CPU: a CUDA generator's state cannot go on as a CPU one's. The sampler seeds a new
    stream from the saved state, the same on every resume of it, another for another state, and says so."""
    draws = []
    for state in (cuda_generator_state(1, 64), cuda_generator_state(1, 64), cuda_generator_state(1, 96)):
        s = EpisodeSampler(coded_bank(), 5, 1, 5, seed=7)
        with caplog.at_level("WARNING", logger="fewshot.data.sampler"):
            assert s.load_state_dict({"generator": state, "device": "cuda"}) is False
        draws.append(s.sample(3).support_x)
    fresh = EpisodeSampler(coded_bank(), 5, 1, 5, seed=7).sample(3).support_x
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert not torch.equal(draws[0], fresh)
    assert "drawn on cuda and go on on cpu" in caplog.text


def test_a_state_saved_without_its_device_is_told_by_its_size():
    """Checkpoints from before the sampler recorded its device: a CPU state resumes exactly, a CUDA one reseeds."""
    s = EpisodeSampler(coded_bank(), 5, 1, 5, seed=7)
    state = {"generator": s.generator.get_state()}
    expected = s.sample(3).support_x
    assert s.load_state_dict(state) is True and torch.equal(s.sample(3).support_x, expected)
    assert s.load_state_dict({"generator": cuda_generator_state(1)}) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a real CUDA generator's state")
def test_cuda_and_cpu_samplers_take_each_others_states():
    on_gpu = EpisodeSampler(coded_bank(), 5, 1, 5, device="cuda", seed=7)
    on_cpu = EpisodeSampler(coded_bank(), 5, 1, 5, seed=7)
    assert on_cpu.load_state_dict(on_gpu.state_dict()) is False
    assert on_gpu.load_state_dict(on_cpu.state_dict()) is False
    on_cpu.sample(2), on_gpu.sample(2)
    again = EpisodeSampler(coded_bank(), 5, 1, 5, device="cuda", seed=3)
    assert again.load_state_dict(on_gpu.state_dict()) is True


def test_fixed_episodes_repeat_and_cover_count():
    s = EpisodeSampler(coded_bank(), 5, 1, 5, seed=0)
    first = torch.cat([e.support_x for e in fixed_episodes(s, 23, 10, seed=99)])
    s.sample(4)  # the stream moved on; a seeded fixed set does not care
    second = torch.cat([e.support_x for e in fixed_episodes(s, 23, 10, seed=99)])
    assert first.shape[0] == 23 and torch.equal(first, second)


def test_rotation_one_per_class_per_task():
    bank = coded_bank(rotate=True)
    # An asymmetric mark so each quarter turn is distinguishable.
    bank.images[:, :, 0, 2, 5] = 200
    ep = EpisodeSampler(bank, ways=5, shots=3, queries=2, seed=4).sample(64)
    seen = set()
    x = torch.cat([ep.support_x.view(64, 5, 3, 1, SIZE, SIZE), ep.query_x.view(64, 5, 2, 1, SIZE, SIZE)], dim=2)
    for t in range(64):
        for w in range(5):
            turns = []
            for img in x[t, w]:
                matches = [k for k in range(4) if (torch.rot90(img, -k, dims=(-2, -1)) * 255).round()[0, 2, 5] == 200]
                assert len(matches) == 1
                turns.append(matches[0])
            assert len(set(turns)) == 1  # the same rotation for every image of the class in this task
            seen.add(turns[0])
    assert seen == {0, 1, 2, 3}


def test_normalization_applied():
    s = EpisodeSampler(coded_bank(), 5, 1, 1, seed=0, mean=(0.5,), std=(0.25,))
    ep = s.sample(2)
    assert torch.allclose(ep.support_x[..., 0, 5, 5], torch.full_like(ep.support_x[..., 0, 5, 5], -2.0))


@pytest.mark.parametrize(
    "ways, shots, queries, message",
    [
        (31, 1, 1, "episode.ways=31 exceeds the 30 classes"),
        (5, 10, 11, "shots \\+ episode.queries = 10 \\+ 11 exceeds the 20 images per class"),
        (0, 1, 1, "episode.ways=0"),
        (5, 0, 1, "episode.shots=0"),
        (5, 1, -1, "episode.queries=-1"),
    ],
)
def test_episode_that_does_not_fit_is_refused(ways, shots, queries, message):
    with pytest.raises(DataError, match=message):
        EpisodeSampler(coded_bank(), ways, shots, queries)
