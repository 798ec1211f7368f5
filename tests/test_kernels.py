"""The fused CPU loops (merge/numerics/kernels.py) write the bytes the torch operations
write: every task-vector method, bfloat16 and float32 in and out, signed zeros, NaN,
infinities, ties and rounding halfway between two bfloat16 values; and a ternary
delta's decode, whatever the block, the span and the scales (+0 included)."""

from __future__ import annotations

import pytest
import torch
from conftest import loop_calls

from hivemerge.merge.deltas.codecs import CODECS
from hivemerge.merge.methods import METHODS, TensorJob
from hivemerge.merge.numerics import exact, kernels
from hivemerge.merge.numerics.bits import pack_bits

TASK_VECTOR_METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                       "della", "della_linear"]
N = 70_001  # spans of 2**18 would hide a partial one: the sparsify chunk is shrunk below


@pytest.fixture(autouse=True)
def fused_at_any_size(monkeypatch):
    """These tensors are small: the loops take them anyway (they leave tensors below
    MIN_ENTRIES to torch only to spare small merges numba's load time)."""
    monkeypatch.setattr(kernels, "MIN_ENTRIES", 0)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def experts(dtype: torch.dtype, non_finite: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base holding +0 and -0, and three experts: one with few distinct deltas (ties), one
    that leaves 40% of entries as they are, one with deltas of -0.0 and large values."""
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(N, generator=g) * 0.05).to(dtype)
    base[::13] = 0.0
    base[5::17] = -0.0
    ties = (base.float() + torch.randint(-3, 4, (N,), generator=g) / 64).to(dtype)
    some = (base.float() + torch.randn(N, generator=g) * 0.01).to(dtype)
    same = torch.rand(N, generator=g) < 0.4
    some[same] = base[same]  # unchanged entries
    wide = (base.float() + torch.randn(N, generator=g) * 3).to(dtype)
    wide[::7] = -0.0  # -0.0 - (+0.0) is -0.0 where the base is +0
    if non_finite:
        ties[::997] = float("inf")
        some[3::1009] = float("nan")
        wide[7::2003] = -float("inf")
    return base, [ties, some, wide]


def job(method: str, dtype: torch.dtype, out_dtype: torch.dtype, non_finite: bool, normalize: bool) -> TensorJob:
    base, models = experts(dtype, non_finite)
    model_params = [{"weight": w, "density": d, "gamma": 0.05, "epsilon": 0.1}
                    for w, d in zip([1.0, -0.5, 0.7], [0.37, 0.8, 0.2])]
    params = {"normalize": normalize, "lambda": 1.3, "rescale": not non_finite, "int8_mask": False}
    return TensorJob("w", base, models, model_params, params, torch.float32, out_dtype, model_ids=[0, 1, 2], seed=5)


@pytest.mark.parametrize("method", TASK_VECTOR_METHODS)
@pytest.mark.parametrize("dtype, out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.float32), (torch.float32, torch.float32)],
                         ids=["bf16", "f32-bf16", "bf16-f32", "f32"])
@pytest.mark.parametrize("non_finite", [False, True], ids=["finite", "inf-nan"])
def test_fused_merge_writes_the_bytes_of_the_torch_operations(monkeypatch, method, dtype, out_dtype, non_finite):
    from hivemerge.merge.methods import sparsify

    monkeypatch.setattr(sparsify, "_CPU_CHUNK", 1 << 14)  # several spans, the last one partial
    seen = loop_calls(monkeypatch, names=("mix", "task_vector", "magnitudes", "high_bit_counts"))
    for normalize in (True, False):
        with kernels.disabled():  # whichever threads run the spans
            want = METHODS[method].merge(job(method, dtype, out_dtype, non_finite, normalize))
        assert not any(seen.values()), seen
        got = METHODS[method].merge(job(method, dtype, out_dtype, non_finite, normalize))
        assert seen["mix"] == 5 and seen["task_vector"] == 15  # 70001 entries: 5 spans of 2**14, 3 experts
        if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):  # a magnitude selection: its loops ran too
            assert seen["high_bit_counts"] == 15 and seen["magnitudes"] >= 15, seen
        seen.update(dict.fromkeys(seen, 0))
        assert got.dtype == out_dtype
        assert torch.equal(bits(got), bits(want)), (method, normalize)
        assert (got == 0).any()  # zeros are written (over bases of -0.0 too): their signs were compared


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "breadcrumbs"])
def test_fused_merge_keeps_the_sign_of_a_zero_sum(monkeypatch, method):
    """Over a base of -0.0, experts of +-0.0 with negative weights: every weighted task
    vector entry is -0.0 (+0 x -w), so is their sum, and -0.0 + -0.0 is written. A sum
    started from +0.0 would write +0.0."""
    base = torch.full((4096,), -0.0, dtype=torch.bfloat16)
    models = [torch.zeros(4096, dtype=torch.bfloat16) for _ in range(3)]
    models[1][::2] = -0.0
    for m in models:
        m[:8] = 0.25  # a changed entry: not the unchanged-tensor shortcut
    run = TensorJob("w", base, models, [{"weight": -0.5, "density": 0.9, "gamma": 0.01}] * 3,
                    {"normalize": False, "lambda": 1.0}, torch.float32, torch.bfloat16, model_ids=[0, 1, 2], seed=0)
    seen = loop_calls(monkeypatch, names=("mix",))
    with kernels.disabled():
        want = METHODS[method].merge(run)
    got = METHODS[method].merge(run)
    assert seen["mix"] == 1  # the fused side ran the loops
    assert torch.equal(bits(got), bits(want))
    if method == "task_arithmetic":
        assert torch.signbit(got[8:]).all() and (got[8:] == 0).all()


def test_fused_merge_rounds_to_bfloat16_as_torch_does(monkeypatch):
    """float32 bases whose low 16 bits are exactly halfway (ties to even), just above and
    below it, NaN and the largest finite values (which round to inf), merged with
    experts equal to them: the output is the base rounded to bfloat16."""
    high = torch.arange(0, 1 << 16, 7, dtype=torch.int64) << 16
    lows = torch.tensor([0x8000, 0x7FFF, 0x8001, 0xFFFF, 0x0001], dtype=torch.int64)
    patterns = (high.view(-1, 1) | lows.view(1, -1)).reshape(-1)
    base = patterns.to(torch.int32).view(torch.float32).clone()
    base[-3:] = torch.tensor([float("nan"), 3.4028235e38, -3.4028235e38])
    run = TensorJob("w", base, [base.clone()], [{"weight": 1.0}], {"normalize": False, "lambda": 1.0}, torch.float32,
                    torch.bfloat16, model_ids=[0], seed=0)
    seen = loop_calls(monkeypatch, names=("mix",))
    with kernels.disabled():
        want = METHODS["task_arithmetic"].merge(run)
    got = METHODS["task_arithmetic"].merge(run)
    assert seen["mix"] == 1  # the fused side ran the loops
    assert torch.equal(bits(got), bits(want))
    assert torch.isinf(got[-2:]).all() and bits(got)[-3] == bits(want)[-3]


def ternary_parts(n: int, block: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    keep = torch.rand(n, generator=g) < 0.42
    scale = (torch.rand(-(-n // block), generator=g) * 0.01).bfloat16()
    scale[::3] = 0.0  # +0 scales: a kept entry of sign -1 is then -0.0, as torch computes it
    return {"mask": pack_bits(keep), "signs": pack_bits(torch.rand(int(keep.sum()), generator=g) < 0.5), "scale": scale}


@pytest.mark.parametrize("base_dtype, dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)], ids=["bf16", "f32-bf16", "bf16-f32"])
@pytest.mark.parametrize("n, block", [(70_001, 256), (50_000, 100), (33, 8), (8, 8), (262_153, 1000)])
def test_fused_ternary_decode_writes_the_bytes_of_the_torch_operations(monkeypatch, base_dtype, dtype, n, block):
    from hivemerge.merge.deltas import codecs

    monkeypatch.setattr(codecs, "_DECODE_SPAN", 1 << 13)  # many spans, each starting after some kept bits
    g = torch.Generator().manual_seed(n)
    base = (torch.randn(n, generator=g) * 0.05).to(base_dtype)
    base[::5] = 0.0
    base[1::5] = -0.0
    base[2::1001] = float("nan")
    base[3::1003] = float("inf")
    parts = ternary_parts(n, block, g)
    seen = loop_calls(monkeypatch)
    opts = {"block": block, "threshold": 0.8}
    with kernels.disabled():
        want = CODECS["ternary"].decode(base, parts, dtype, (n,), opts)
    assert seen["ternary_span"] == 0
    got = CODECS["ternary"].decode(base, parts, dtype, (n,), opts)
    assert seen["ternary_span"] == -(-n // (1 << 13))
    assert torch.equal(bits(got), bits(want))
    if base_dtype == dtype:  # into the base's own memory, as the engine decodes
        in_place = base.clone()
        assert torch.equal(bits(CODECS["ternary"].decode(in_place, parts, dtype, (n,), opts, out=in_place)), bits(want))


def test_fused_ternary_decode_of_a_delta_that_keeps_nothing(monkeypatch):
    """No kept entry: no sign byte at all, and every entry is the base + 0."""
    n = 4099
    base = torch.randn(n).bfloat16()
    parts = {"mask": torch.zeros((n + 7) // 8, dtype=torch.uint8), "signs": torch.zeros(0, dtype=torch.uint8),
             "scale": torch.full((-(-n // 256),), 0.5).bfloat16()}
    seen = loop_calls(monkeypatch)
    got = CODECS["ternary"].decode(base, parts, torch.bfloat16, (n,), {"block": 256, "threshold": 0.8})
    assert seen["ternary_span"] == 1
    assert torch.equal(bits(got), bits((base.float() + 0.0).bfloat16()))


def test_fused_loops_refuse_spans_outside_the_parts():
    """The loops index without bounds checks: their wrappers check the sizes first."""
    base = torch.zeros(64, dtype=torch.bfloat16)
    parts = ternary_parts(64, 8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        kernels.ternary_span(base, parts["mask"][:4], parts["signs"], parts["scale"], 8, 0, 64, 0, base.clone())
    with pytest.raises(ValueError):
        kernels.ternary_span(base, parts["mask"], parts["signs"], parts["scale"][:3], 8, 0, 64, 0, base.clone())
    with pytest.raises(ValueError):
        kernels.task_vector(base, base[:10], 0, None, None, None, 1.0, 1.0, torch.empty(64))
    with pytest.raises(ValueError):
        kernels.mix(torch.zeros(2, 64), [1.0], True, True, 1.0, 1.0, base, base.clone())


def test_other_dtypes_devices_and_small_tensors_take_the_torch_operations(monkeypatch):
    assert kernels.usable(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4))
    assert not kernels.usable(torch.zeros(4, dtype=torch.float16))
    assert not kernels.usable(torch.zeros(4, dtype=torch.float64))
    assert not kernels.usable(torch.zeros(4, 4).T)  # not contiguous
    with kernels.disabled():
        assert not kernels.usable(torch.zeros(4))
    assert kernels.usable(torch.zeros(4))
    monkeypatch.setattr(kernels, "MIN_ENTRIES", 1 << 20)
    assert not kernels.usable(torch.zeros(4)) and kernels.fits(torch.zeros(4))
    assert kernels.usable(torch.zeros(4), torch.zeros(1 << 20))
    cpu = torch.device("cpu")
    assert kernels.wanted(cpu, 1 << 20) and not kernels.wanted(cpu, 4) and not kernels.wanted(torch.device("meta"), 1 << 20)
    with kernels.disabled():
        assert not kernels.wanted(cpu, 1 << 20)


def test_a_small_merge_never_loads_numba(tmp_path):
    """Tests, the demo and other small merges keep the torch operations, and the second
    numba would cost each process to load."""
    code = (
        "import sys, torch\n"
        "from hivemerge.merge.methods import METHODS, TensorJob\n"
        "base = torch.randn(1000).bfloat16(); models = [base + 1, base - 1]\n"
        "job = TensorJob('w', base, models, [{'weight': 1.0, 'density': 0.5}] * 2, {'normalize': True, 'lambda': 1.0},\n"
        "                torch.float32, torch.bfloat16, model_ids=[0, 1], seed=0)\n"
        "METHODS['ties'].merge(job)\n"
        "print('numba' in sys.modules)\n"
    )
    import subprocess
    import sys

    found = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert found.stdout.strip() == "False", found.stderr


def test_the_loops_run_where_numba_can_cache_nowhere():
    """A read-only install and home: numba finds no place for its cache (here: no cache
    locator at all), and each process compiles the loops instead of the merge failing."""
    code = (
        "import numba.core.caching as caching, torch\n"
        "impl = getattr(caching, 'CacheImpl', None) or caching._CacheImpl\n"
        "impl._locator_classes = []\n"
        "from hivemerge.merge.numerics import fused_loops, kernels\n"
        "values = torch.zeros(1 << 20); ok = kernels.finite(values); values[-1] = float('inf')\n"
        "print(type(fused_loops.finite._cache).__name__, ok, kernels.finite(values))\n"
    )
    import subprocess
    import sys

    found = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert found.stdout.split() == ["NullCache", "True", "False"], found.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_magnitudes_are_the_selections_values(dtype):
    """|model - base| as the selection compares it: NaN with its sign bit cleared, inf, +0 for -0.0."""
    base, models = experts(dtype, non_finite=True)
    for model in models:
        want = (model.float() - base.float()).abs()
        assert torch.equal(bits(kernels.magnitudes(base, model)), bits(want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_finiteness_check_sees_every_inf_and_nan(dtype):
    values = torch.randn(10_001).to(dtype)
    values[7] = torch.finfo(dtype).max
    values[8] = -torch.finfo(dtype).max
    assert kernels.finite(values)
    for bad in (float("inf"), -float("inf"), float("nan")):
        for at in (0, 5000, 10_000):
            spoiled = values.clone()
            spoiled[at] = bad
            assert not kernels.finite(spoiled)
            assert not exact.all_finite(spoiled)


def test_fused_high_bit_counts_are_torchs_bincount():
    values = (torch.rand(300_001) * 10.0).pow(8)  # magnitudes over many exponents
    values[::97] = 0.0
    values[5::1001] = float("inf")
    values[9::1003] = float("nan")
    want = torch.bincount(values.view(torch.int32) >> 16, minlength=1 << 15)
    assert torch.equal(kernels.high_bit_counts(values, 1 << 15), want)
    with pytest.raises(ValueError):  # a negative value: bincount refuses it too
        kernels.high_bit_counts(torch.tensor([1.0, -2.0]), 1 << 15)


def test_the_radix_select_counts_by_the_fused_loop_and_cuts_as_the_sort(monkeypatch):
    seen = loop_calls(monkeypatch, names=("high_bit_counts",))
    g = torch.Generator().manual_seed(2)
    values = torch.randint(0, 50, (200_003,), generator=g).float() / 16  # many ties
    for k in (1, 777, 100_000, 200_003):
        cut = exact.top_k_cuts(exact._pieces(values, 1 << 14), [k])[0]
        order = torch.sort(values, descending=True, stable=True).indices[:k]
        want = torch.zeros_like(values, dtype=torch.bool)
        want[order] = True
        assert torch.equal(cut.keep_bits(values).bool(), want), k
    assert seen["high_bit_counts"] == 4 * 13  # 13 spans of 2**14, once per cut


def test_the_loops_refuse_a_tensor_whose_flat_view_would_be_a_copy():
    """A transposed output would be copied flat, and the loop's results lost in the copy."""
    out = torch.zeros(64, 32).t()
    with pytest.raises(ValueError, match="contiguous"):
        kernels.raw(out)
    assert kernels.raw(out.contiguous()).shape == (2048,)
