"""The counter-based noise stream: Philox correctness, statistics, batch independence."""
import math

import pytest
import torch

from fastddpm import rng

M32 = 0xFFFFFFFF


def t1(v):
    return torch.tensor([v])


@pytest.mark.parametrize("ctr,key,want", [
    # Random123 known-answer vectors for philox4x32_10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(ctr, key, want):
    got = rng.philox4x32(*(t1(c) for c in ctr), *key)
    assert tuple(int(w) for w in got) == want


def test_mul_hi_lo_is_exact():
    b = torch.randint(0, 2**32, (10_000,), dtype=torch.long)
    b[:3] = torch.tensor([0, 1, M32])
    for a in (rng.ROUND_A, rng.ROUND_B, M32):
        hi, lo = rng._mul_hi_lo(a, b)
        for bb, h, l_ in zip(b[:50].tolist() + b[-3:].tolist(), hi[:50].tolist() + hi[-3:].tolist(),
                             lo[:50].tolist() + lo[-3:].tolist()):
            assert (h, l_) == ((a * bb) >> 32, (a * bb) & M32)


def test_normal_statistics_and_independence():
    z = rng.normal(7, torch.arange(64), 3, 4099)  # (64, 4099): odd element count
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
    # 4th moment of a standard normal is 3; tails exist (Box-Muller, not a truncated approximation)
    assert abs((z**4).mean().item() - 3) < 0.1
    assert z.abs().max() > 4
    # independence: across samples, across steps, across neighbouring elements (within one Philox block)
    other_step = rng.normal(7, torch.arange(64), 4, 4099)
    other_seed = rng.normal(8, torch.arange(64), 3, 4099)
    for a, b in ((z[:-1], z[1:]), (z, other_step), (z, other_seed), (z[:, :-1], z[:, 1:])):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(a.numel()), r


def test_sample_noise_does_not_depend_on_batch():
    full = rng.normal(123, torch.arange(7), 5, 300)
    for i in range(7):
        one = rng.normal(123, torch.tensor([i]), 5, 300)
        torch.testing.assert_close(one[0], full[i], rtol=0, atol=0)
    per_sample_tag = rng.normal(123, torch.arange(7), torch.tensor([5, 5, 6, 5, 5, 5, 5]), 300)
    torch.testing.assert_close(per_sample_tag[[0, 1, 3]], full[[0, 1, 3]], rtol=0, atol=0)
    assert not torch.allclose(per_sample_tag[2], full[2])


def test_seed_validation():
    for bad in (-1, 2**64, 1.5, True, "1"):
        with pytest.raises(ValueError, match="seed"):
            rng.normal(bad, torch.arange(2), 0, 4)
    rng.normal(2**64 - 1, torch.arange(2), 0, 4)
