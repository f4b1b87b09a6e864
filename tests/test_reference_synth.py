"""The fixture generator reproduces the reference fixture's weights and images bit for bit."""
from pathlib import Path

import pytest
import torch

from tests import reference_synth as synth

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURES / "r50_128x352_3frames.pt", weights_only=True)


def test_fnv1a32_known_values():
    # published FNV-1a 32-bit test vectors
    assert synth.fnv1a32("") == 0x811C9DC5
    assert synth.fnv1a32("a") == 0xE40C292C
    assert synth.fnv1a32("foobar") == 0xBF9CF968


def test_hash_uniform_matches_the_integer_recipe():
    salt = 12345
    values = synth.hash_uniform(4, salt)
    for i, value in enumerate(values.tolist()):
        h = (i * 2654435761 + salt) % 2**32
        h ^= h >> 16
        h = (h * 0x45D9F3B) % 2**32
        h ^= h >> 16
        h = (h * 0x45D9F3B) % 2**32
        h ^= h >> 16
        assert value == h / 2**32


def test_weights_match_the_fixture_checksums_exactly(fixture):
    shapes = synth.load_key_list(FIXTURES / "reference_state_dict_r50_704.json")
    state = synth.make_state_dict(shapes, fixture["constants"])
    assert set(state) == set(fixture["weights_checksum"])
    for key, (total, abs_total) in fixture["weights_checksum"].items():
        value = state[key].double()
        # the values are bit-exact; the float64 sums only differ by summation order (threads)
        assert value.sum().item() == pytest.approx(total, rel=1e-12, abs=1e-9), key
        assert value.abs().sum().item() == pytest.approx(abs_total, rel=1e-12), key


def test_shared_branch_slots_are_identical():
    shapes = {f"pts_bbox_head.cls_branches.{i}.0.weight": (4, 4) for i in range(6)}
    state = synth.make_state_dict(shapes, {})
    assert all(torch.equal(state["pts_bbox_head.cls_branches.0.0.weight"], v) for v in state.values())


def test_images_match_the_fixture_probes(fixture):
    for k, salt in enumerate(fixture["inputs"]["img_salt"]):
        images = synth.make_images(salt, (6, 3, 128, 352)).double()
        probe = fixture["inputs"]["img_probe"][k]
        assert images.sum().item() == probe["sum"] and images.abs().sum().item() == probe["abs_sum"]
        flat = images.flatten()
        index = (torch.arange(997) * (flat.numel() - 1)) // 996
        assert torch.equal(flat[index].float(), probe["sample"].float())
