"""Exact selections and reductions (hivemerge.merge.numerics.exact) and DARE's keyed masks (rng)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from hivemerge.merge.numerics import exact, rng


def samples():
    """Non-negative float32 vectors: many ties, zeros, wide exponents, a constant vector."""
    g = torch.Generator().manual_seed(0)
    yield "small-int", torch.randint(0, 5, (1000,), generator=g).float()
    yield "two-values", torch.randint(0, 2, (257,), generator=g).float() * 0.375
    yield "wide", torch.rand(2000, generator=g) * torch.pow(10.0, torch.randint(-30, 30, (2000,), generator=g).float())
    yield "tiny+zeros", torch.cat([torch.zeros(50), torch.full((30,), 1e-42), torch.rand(100, generator=g)])
    yield "constant", torch.full((64,), 0.1)
    yield "2-d", torch.randint(0, 7, (16, 24), generator=g).float() / 4


def reference_order(values: torch.Tensor) -> list[int]:
    """Flat indices by descending value, ties by ascending index (a plain sort)."""
    flat = values.reshape(-1).tolist()
    return sorted(range(len(flat)), key=lambda i: (-flat[i], i))


@pytest.mark.parametrize("name,values", list(samples()), ids=[n for n, _ in samples()])
def test_kth_largest_matches_sorting(name, values):
    ordered = sorted(values.reshape(-1).tolist(), reverse=True)
    n = len(ordered)
    for k in sorted({1, 2, 3, n // 7 + 1, n // 2, n - 1, n}):
        got = exact.kth_largest(values, k)
        assert got.dtype == torch.float32
        assert got.item() == ordered[k - 1], (name, k)


@pytest.mark.parametrize("name,values", list(samples()), ids=[n for n, _ in samples()])
def test_top_k_mask_matches_sorting_and_breaks_ties_by_index(name, values):
    order = reference_order(values)
    n = len(order)
    previous = torch.zeros(n, dtype=torch.bool)
    for k in sorted({0, 1, 5, n // 3, n // 2, n - 1, n}):
        mask = exact.top_k_mask(values, k)
        assert mask.shape == values.shape and mask.dtype == torch.bool
        flat = mask.reshape(-1)
        want = torch.zeros(n, dtype=torch.bool)
        want[order[:k]] = True
        assert torch.equal(flat, want), (name, k)
        assert int(flat.sum()) == k
        assert bool((previous <= flat).all())  # nested: the top j are inside the top k for j <= k
        previous = flat


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_top_k_mask_other_dtypes(dtype):
    values = torch.randint(0, 6, (500,), generator=torch.Generator().manual_seed(9)).to(dtype) / 4
    order = reference_order(values)
    for k in (1, 37, 250, 499):
        want = torch.zeros(500, dtype=torch.bool)
        want[order[:k]] = True
        assert torch.equal(exact.top_k_mask(values, k), want), (dtype, k)


def test_top_k_mask_tie_rule_by_hand():
    values = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0])
    # k=3: both 3s (i1, i3), then the first 2 (i2)
    assert exact.top_k_mask(values, 3).tolist() == [False, True, True, True, False, False, False]
    # k=4: the 2s at i2 and i4
    assert exact.top_k_mask(values, 4).tolist() == [False, True, True, True, True, False, False]


@pytest.mark.parametrize("name,values", list(samples()), ids=[n for n, _ in samples()])
def test_rank_window_mask(name, values):
    order = reference_order(values)
    n = len(order)
    for skip, keep in [(0, n // 4), (1, n // 4), (n // 10, n // 2), (n // 3, n - n // 3)]:
        want = torch.zeros(n, dtype=torch.bool)
        want[order[skip : skip + keep]] = True
        assert torch.equal(exact.rank_window_mask(values, skip, keep).reshape(-1), want), (name, skip, keep)


def test_kth_largest_rejects_bad_input():
    with pytest.raises(ValueError):
        exact.kth_largest(torch.ones(4), 5)
    with pytest.raises(ValueError):
        exact.kth_largest(torch.ones(4), 0)
    with pytest.raises(TypeError):
        exact.kth_largest(torch.ones(4, dtype=torch.float64), 1)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("source", DTYPES, ids=str)
@pytest.mark.parametrize("target", DTYPES, ids=str)
def test_all_finite_is_isfinite_after_conversion(source, target):
    """On the values' bits when the conversion is exact, by conversion otherwise; spans of 3."""
    for value in (1.0, -0.0, 1e-45, 7e4, -7e4, 3e38, 1e300, math.inf, -math.inf, math.nan):
        values = torch.tensor([0.5, 0.25, -2.0, 1.0, value, 4.0, 8.0], dtype=source)
        want = bool(torch.isfinite(values.to(target)).all())
        assert exact.all_finite(values, target, span=3) is want, (source, target, value)
        assert exact.all_finite(values, span=3) is bool(torch.isfinite(values).all())
    assert exact.all_finite(torch.zeros(0, dtype=source), target)


def test_pairwise_sum_of_float32_is_exact():
    # torch.rand gives multiples of 2**-24 below 1: 5000 of them sum exactly in float64.
    x = torch.rand(5000, generator=torch.Generator().manual_seed(1))
    got = exact.pairwise_sum(x)
    assert got.dtype == torch.float64
    assert got.item() == math.fsum(x.tolist())


def test_pairwise_sum_float64_close_to_fsum():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100_003, dtype=torch.float64, generator=g) * torch.pow(10.0, torch.randint(-3, 4, (100_003,), generator=g))
    got = exact.pairwise_sum(x).item()
    want = math.fsum(x.tolist())
    # pairwise summation: error below ~log2(n) roundings of the magnitude sum
    bound = 17 * math.ulp(math.fsum(abs(v) for v in x.tolist()))
    assert abs(got - want) <= bound


def test_pairwise_sum_along_a_dimension():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert exact.pairwise_sum(x, dim=1).tolist() == [6.0, 22.0, 38.0]
    assert exact.pairwise_sum(x, dim=0).tolist() == [12.0, 15.0, 18.0, 21.0]
    assert exact.pairwise_sum(torch.zeros(2, 0)).tolist() == [0.0, 0.0]


def test_dot_is_exact_on_small_integers():
    a = torch.tensor([1.0, -2.0, 3.0, 0.5])
    b = torch.tensor([4.0, 5.0, -6.0, 8.0])
    assert exact.dot(a, b).item() == 4 - 10 - 18 + 4


def test_reductions_independent_of_thread_count():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1 << 20, generator=g)
    y = torch.randn(1 << 20, generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(
                (exact.pairwise_sum(x).view(torch.int64).item(), exact.dot(x, y).view(torch.int64).item(),
                 exact.top_k_mask(x.abs(), 1000), exact.kth_largest(x.abs(), 12345).item())
            )
    finally:
        torch.set_num_threads(before)
    assert results[0][:2] == results[1][:2]  # the same bits
    assert torch.equal(results[0][2], results[1][2])
    assert results[0][3] == results[1][3]


# -- DARE masks ----------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.9])
def test_bernoulli_keep_fraction(density):
    mask = rng.bernoulli_mask(rng.stream_key(0, "model.layers.0.mlp.up_proj.weight", 1), 100_000, density)
    assert mask.dtype == torch.bool and mask.shape == (100_000,)
    assert abs(mask.float().mean().item() - density) < 0.01


def test_bernoulli_extremes():
    key = rng.stream_key(0, "w", 0)
    assert bool(rng.bernoulli_mask(key, 1000, 1.0).all())
    assert not bool(rng.bernoulli_mask(key, 1000, 0.0).any())


def test_masks_depend_on_seed_name_and_index_only():
    n, p = 4096, 0.5
    base = rng.bernoulli_mask(rng.stream_key(0, "a.weight", 1), n, p)
    assert torch.equal(base, rng.bernoulli_mask(rng.stream_key(0, "a.weight", 1), n, p))
    for other in [(1, "a.weight", 1), (0, "b.weight", 1), (0, "a.weight", 2)]:
        mask = rng.bernoulli_mask(rng.stream_key(*other), n, p)
        agree = (mask == base).float().mean().item()
        assert 0.45 < agree < 0.55, other  # unrelated streams agree about half the time
    # a lower density keeps a subset: the same stream, a lower threshold
    assert bool((rng.bernoulli_mask(rng.stream_key(0, "a.weight", 1), n, 0.3) <= base).all())


def test_mask_does_not_depend_on_chunking(monkeypatch):
    key = rng.stream_key(3, "x", 0)
    whole = rng.bernoulli_mask(key, 1000, 0.4)
    monkeypatch.setattr(rng, "_CHUNK", 77)
    assert torch.equal(rng.bernoulli_mask(key, 1000, 0.4), whole)
    # elements are addressed by position: a window of the stream equals the same slice
    assert torch.equal(rng.uint32_stream(key, 300, 50), rng.uint32_stream(key, 0, 1000)[300:350])


def _lowbias32(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_stream_matches_a_plain_integer_reference():
    """Element i is lowbias32(lowbias32(low32(i) ^ k0) ^ high32(i) ^ k1), computed here with
    Python integers, including indices past 2**32 where the high word takes part."""
    key = rng.stream_key(7, "model.layers.3.mlp.down_proj.weight", 2)
    start = (1 << 32) - 5000
    got = rng.uint32_stream(key, start, 300_000)
    for offset in (0, 1, 4999, 5000, 5001, 123_456, 299_999):
        i = start + offset
        want = _lowbias32(_lowbias32((i & 0xFFFFFFFF) ^ key[0]) ^ (i >> 32) ^ key[1])
        assert int(got[offset]) == want, offset
    # and the bytes of the whole window, so a rewrite of the hash cannot move any mask
    assert hashlib.sha256(got.numpy().tobytes()).hexdigest().startswith("ade156ed0fa0929f")


def test_cpu_masks_hashed_in_steps_equal_one_pass(monkeypatch):
    """bernoulli_chunk hashes the CPU stream in cache-sized steps; the bits are those of
    one pass over the whole chunk (an odd start and a partial last step included)."""
    key = rng.stream_key(7, "model.layers.3.mlp.down_proj.weight", 2)
    one_pass = rng.uint32_stream(key, 123_457, 200_003) < round(0.9 * (1 << 32))
    assert torch.equal(rng.bernoulli_chunk(key, 123_457, 200_003, 0.9), one_pass)
    monkeypatch.setattr(rng, "_CPU_STEP", 1000)
    assert torch.equal(rng.bernoulli_chunk(key, 123_457, 200_003, 0.9), one_pass)
    mask = rng.bernoulli_mask(key, 5_000_011, 0.37)
    assert int(mask.sum()) == 1_849_737
    assert hashlib.sha256(mask.numpy().tobytes()).hexdigest().startswith("b4a5bdf65b52c0c3")


def test_stream_key_is_sha256_of_the_triple():
    import hashlib

    digest = hashlib.sha256(b"7\x00model.norm.weight\x003").digest()
    assert rng.stream_key(7, "model.norm.weight", 3) == (
        int.from_bytes(digest[:4], "little"),
        int.from_bytes(digest[4:8], "little"),
    )


def test_uint32_stream_is_the_lowbias32_hash():
    """Element i of the stream, recomputed with Python integers."""

    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    key = rng.stream_key(1, "t", 0)
    start = (1 << 32) - 3  # crosses the 2**32 boundary, where the high word joins in
    got = rng.uint32_stream(key, start, 6).tolist()
    want = [mix(mix((i & 0xFFFFFFFF) ^ key[0]) ^ (i >> 32) ^ key[1]) for i in range(start, start + 6)]
    assert got == want


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divisor", [3, 1.7, 0.45, 7])
def test_divide_rounds_once_on_every_device(device, divisor):
    """One correctly rounded division (float64 holds every float32 quotient exactly
    enough to round once), not a multiplication by a rounded reciprocal, which is what
    CUDA does with `x / number` and which differs in 26 to 54 % of the entries here."""
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(3))
    d32 = torch.tensor(divisor, dtype=torch.float32).double()
    want = (x.double() / d32).float()
    got = exact.divide(x.to(device), divisor).cpu()
    assert torch.equal(got, want)
    reciprocal = (x.double() * (1 / d32).float().double()).float()  # what CUDA's x / number computes
    assert not torch.equal(reciprocal, want)  # so this test tells the two apart
    into = x.clone().to(device)
    assert exact.divide(into, divisor, out=into) is into and torch.equal(into.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_divide_half_types_in_float32_like_the_cpu(device, dtype):
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(4)).to(dtype)
    want = (x.float() / torch.tensor(1.7, dtype=torch.float32)).to(dtype)  # the number is not rounded to the half type
    assert torch.equal(exact.divide(x.to(device), 1.7).cpu(), want)
    assert torch.equal(x / 1.7, want)  # what the CPU does with a number
