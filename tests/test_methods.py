"""Every merge method on tiny tensors, against values worked out by hand in the test.

The inputs are model directories holding one 1-D tensor ``w`` (or a 2-D ``m``), merged
through the real path: recipe validation, the streaming engine, safetensors output.
Dyadic inputs (multiples of 1/8) make most results exact in float32; the others are
compared with tolerances far below the differences a wrong coefficient would make.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import merge_doc, write_tensors

from hivemerge.merge.numerics import rng
from hivemerge.protocol.errors import UserInputError

F32 = {"dtype": "float32", "out_dtype": "float32"}


def vec(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def models(tmp_path, **vectors) -> dict[str, str]:
    """One model directory per keyword, each holding tensor ``w``; returns their paths."""
    return {name: str(write_tensors(tmp_path / name, {"w": vec(v)})) for name, v in vectors.items()}


def merged_w(tmp_path, document: dict) -> list[float]:
    out = merge_doc({**F32, **document}, tmp_path / "out")
    assert out["w"].dtype == torch.float32
    return out["w"].tolist()


def close(got, want, rel=1e-6, abs_=1e-6) -> bool:
    return len(got) == len(want) and all(math.isclose(g, w, rel_tol=rel, abs_tol=abs_) for g, w in zip(got, want))


# -- linear -----------------------------------------------------------------------

A = [1.0, 2.0, 3.0, 4.0]
B = [5.0, -2.0, 0.5, 8.0]


def test_linear_normalized(tmp_path):
    p = models(tmp_path, a=A, b=B)
    got = merged_w(tmp_path, {
        "merge_method": "linear",
        "models": [{"model": p["a"], "parameters": {"weight": 1.0}}, {"model": p["b"], "parameters": {"weight": 3.0}}],
    })
    # (1*a + 3*b) / (1 + 3) = [1+15, 2-6, 3+1.5, 4+24] / 4
    assert got == [16 / 4, -4 / 4, 4.5 / 4, 28 / 4] == [4.0, -1.0, 1.125, 7.0]


def test_linear_not_normalized(tmp_path):
    p = models(tmp_path, a=A, b=B)
    got = merged_w(tmp_path, {
        "merge_method": "linear",
        "models": [{"model": p["a"], "parameters": {"weight": 1.0}}, {"model": p["b"], "parameters": {"weight": 3.0}}],
        "parameters": {"normalize": False},
    })
    assert got == [16.0, -4.0, 4.5, 28.0]


def test_linear_inexact_weights(tmp_path):
    p = models(tmp_path, a=A, b=B)
    got = merged_w(tmp_path, {
        "merge_method": "linear",
        "models": [{"model": p["a"], "parameters": {"weight": 0.2}}, {"model": p["b"], "parameters": {"weight": 0.5}}],
    })
    want = [(0.2 * a + 0.5 * b) / 0.7 for a, b in zip(A, B)]
    assert close(got, want)
    assert not close(got, [0.2 * a + 0.5 * b for a, b in zip(A, B)])


# -- task arithmetic ---------------------------------------------------------------


def test_task_arithmetic_with_lambda(tmp_path):
    base = [1.0, 1.0, 1.0, 1.0]
    m1 = [2.0, 0.0, 1.0, 3.0]  # delta [1, -1, 0, 2]
    m2 = [1.0, 3.0, -1.0, 1.0]  # delta [0, 2, -2, 0]
    p = models(tmp_path, base=base, m1=m1, m2=m2)
    got = merged_w(tmp_path, {
        "merge_method": "task_arithmetic",
        "base_model": p["base"],
        "models": [
            {"model": p["base"]},  # the base among the models adds no task vector and needs no weight
            {"model": p["m1"], "parameters": {"weight": 0.5}},
            {"model": p["m2"], "parameters": {"weight": 1.0}},
        ],
        "parameters": {"lambda": 2.0},
    })
    # 0.5*d1 + 1*d2 = [0.5, 1.5, -2, 1]; * lambda 2 = [1, 3, -4, 2]; + base
    assert got == [2.0, 4.0, -3.0, 3.0]


def test_task_arithmetic_normalize(tmp_path):
    p = models(tmp_path, base=[0.0, 0.0], m1=[1.0, 2.0], m2=[3.0, -2.0])
    got = merged_w(tmp_path, {
        "merge_method": "task_arithmetic",
        "base_model": p["base"],
        "models": [{"model": p["m1"], "parameters": {"weight": 1.0}}, {"model": p["m2"], "parameters": {"weight": 3.0}}],
        "parameters": {"normalize": True},
    })
    # (1*[1,2] + 3*[3,-2]) / 4 = [10, -4] / 4
    assert got == [2.5, -1.0]


# -- TIES --------------------------------------------------------------------------

TB = [1.0, -1.0, 0.5, 2.0, 0.0, 1.0, -0.5, 3.0]
D1 = [3.0, -1.0, 2.0, -4.0, 0.5, 1.5, -2.5, 0.25]
D2 = [-2.0, 1.0, -4.0, 1.0, 4.0, -0.5, 1.0, 2.0]


def ties_models(tmp_path):
    return models(tmp_path, base=TB, m1=[b + d for b, d in zip(TB, D1)], m2=[b + d for b, d in zip(TB, D2)])


def ties_doc(p, **global_params):
    return {
        "merge_method": "ties",
        "base_model": p["base"],
        "models": [
            {"model": p["m1"], "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": p["m2"], "parameters": {"weight": 0.5, "density": 0.375}},
        ],
        "parameters": global_params,
    }


# Worked by hand:
#   m1: k = int(0.5 * 8) = 4; |D1| ranks: 4 (i3), 3 (i0), 2.5 (i6), 2 (i2)
#       trimmed t1 = [3, 0, 2, -4, 0, 0, -2.5, 0]
#   m2: k = int(0.375 * 8) = 3; |D2| = [2, 1, 4, 1, 4, .5, 1, 2]: 4 (i2), 4 (i4), then the
#       tie of 2s at i0 and i7 goes to the lower index i0: t2 = [-2, 0, -4, 0, 4, 0, 0, 0]
#   weighted: w1*t1 = t1; w2*t2 = [-1, 0, -2, 0, 2, 0, 0, 0]
#   sum = [2, 0, 0, -4, 2, 0, -2.5, 0] -> elected sign (>= 0 is +): [+, +, +, -, +, +, -, +]
#   agreeing: i0 m1 (3); i2 m1 (2; the sum is 0, so + wins over m2's -2); i3 m1 (-4);
#             i4 m2 (2); i6 m1 (-2.5)
#   sum of agreeing = [3, 0, 2, -4, 2, 0, -2.5, 0]
#   divisor (agreeing weights, 0 -> 1) = [1, 1, 1, 1, 0.5, 1, 1, 1]
TIES_MIXED = [3.0, 0.0, 2.0, -4.0, 2.0, 0.0, -2.5, 0.0]
TIES_DIVISOR = [1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0]


def test_ties_normalized(tmp_path):
    got = merged_w(tmp_path, ties_doc(ties_models(tmp_path)))
    want = [b + m / d for b, m, d in zip(TB, TIES_MIXED, TIES_DIVISOR)]
    assert want == [4.0, -1.0, 2.5, -2.0, 4.0, 1.0, -3.0, 3.0]
    assert got == want


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_ties_in_other_compute_dtypes(tmp_path, dtype):
    """Every input and intermediate value above is exact in these dtypes too."""
    got = merged_w(tmp_path, {**ties_doc(ties_models(tmp_path)), "dtype": dtype, "out_dtype": "float32"})
    assert got == [4.0, -1.0, 2.5, -2.0, 4.0, 1.0, -3.0, 3.0]


def test_ties_not_normalized(tmp_path):
    got = merged_w(tmp_path, ties_doc(ties_models(tmp_path), normalize=False))
    assert got == [b + m for b, m in zip(TB, TIES_MIXED)] == [4.0, -1.0, 2.5, -2.0, 2.0, 1.0, -3.0, 3.0]


def test_ties_lambda(tmp_path):
    got = merged_w(tmp_path, ties_doc(ties_models(tmp_path), **{"lambda": 0.5}))
    assert got == [b + 0.5 * m / d for b, m, d in zip(TB, TIES_MIXED, TIES_DIVISOR)]
    assert got == [2.5, -1.0, 1.5, 0.0, 2.0, 1.0, -1.75, 3.0]


def _reference_ties(base, deltas, weights, densities, normalize):
    """TIES in plain Python: sort-based top-k (ties to the lower index), sign election, disjoint mean."""
    n = len(base)
    weighted = []
    for d, w, density in zip(deltas, weights, densities):
        k = int(density * n)
        order = sorted(range(n), key=lambda i: (-abs(d[i]), i))
        keep = set(order[:k])
        weighted.append([d[i] * w if i in keep else 0.0 for i in range(n)])
    out = []
    for i in range(n):
        total = sum(wd[i] for wd in weighted)
        sign = 1.0 if total >= 0 else -1.0
        agree = [(wd[i], w) for wd, w in zip(weighted, weights) if wd[i] != 0 and math.copysign(1.0, wd[i]) == sign]
        mixed = sum(v for v, _ in agree)
        divisor = sum(w for _, w in agree) or 1.0
        out.append(base[i] + (mixed / divisor if normalize else mixed))
    return out


@pytest.mark.parametrize("normalize,dtype", [(True, "float32"), (False, "float32"), (True, "float64")])
def test_ties_against_plain_python_with_many_ties(tmp_path, normalize, dtype):
    g = torch.Generator().manual_seed(3)
    n = 64
    base = (torch.randint(-8, 9, (n,), generator=g) / 8).tolist()
    deltas = [torch.randint(-3, 4, (n,), generator=g).float().tolist() for _ in range(3)]
    weights, densities = [1.0, 0.5, 2.0], [0.3, 0.55, 0.8]
    p = models(tmp_path, base=base, **{f"m{j}": [b + d for b, d in zip(base, deltas[j])] for j in range(3)})
    got = merged_w(tmp_path, {
        "merge_method": "ties",
        "base_model": p["base"],
        "models": [
            {"model": p[f"m{j}"], "parameters": {"weight": weights[j], "density": densities[j]}} for j in range(3)
        ],
        "parameters": {"normalize": normalize},
        "dtype": dtype,
    })
    assert close(got, _reference_ties(base, deltas, weights, densities, normalize), rel=1e-6, abs_=1e-6)


# -- DARE --------------------------------------------------------------------------

DB = [0.5, -0.5, 1.0, 0.0, 2.0, -1.0, 0.25, 1.5]
E1 = [1.0, -2.0, 0.5, 3.0, -1.5, 2.0, 4.0, -0.25]
E2 = [-3.0, 1.0, 2.5, -0.5, 1.0, -2.0, 0.75, 2.0]


def dare_doc(p, method, seed, **global_params):
    return {
        "merge_method": method,
        "base_model": p["base"],
        "seed": seed,
        "models": [
            {"model": p["base"]},  # index 0 in `models`: the experts are indices 1 and 2
            {"model": p["m1"], "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": p["m2"], "parameters": {"weight": 0.75, "density": 0.25}},
        ],
        "parameters": global_params,
    }


def dare_masks(seed, indices=(1, 2), densities=(0.5, 0.25)):
    masks = [rng.bernoulli_mask(rng.stream_key(seed, "w", i), 8, d).tolist() for i, d in zip(indices, densities)]
    for m in masks:  # the test means something only if entries are both kept and dropped
        assert 0 < sum(m) < 8
    return masks


def l1_scale(deltas, keep):
    """mergekit's rescale by hand: the sum of |delta| over all entries over that of the kept ones."""
    return sum(abs(d) for d in deltas) / sum(abs(d) for d, k in zip(deltas, keep) if k)


def dare_models(tmp_path):
    return models(tmp_path, base=DB, m1=[b + d for b, d in zip(DB, E1)], m2=[b + d for b, d in zip(DB, E2)])


SEED = 4


@pytest.mark.parametrize("rescale", [True, False])
def test_dare_linear(tmp_path, rescale):
    got = merged_w(tmp_path, dare_doc(dare_models(tmp_path), "dare_linear", SEED, rescale=rescale))
    k1, k2 = dare_masks(SEED)
    s1, s2 = (l1_scale(E1, k1), l1_scale(E2, k2)) if rescale else (1.0, 1.0)
    assert not rescale or (s1 != 1 / 0.5 and s2 != 1 / 0.25)  # not the division by density it was before mergekit 0.1.5
    want = [
        b + 1.0 * (d1 * s1 if keep1 else 0.0) + 0.75 * (d2 * s2 if keep2 else 0.0)
        for b, d1, d2, keep1, keep2 in zip(DB, E1, E2, k1, k2)
    ]
    assert close(got, want) and (rescale or got == want)  # exact on these dyadic values without the scale
    # The masks are keyed by the position in `models`: other positions give other results.
    w1, w2 = dare_masks(SEED, indices=(0, 1))
    assert got != [b + (d1 * s1 if a else 0.0) + 0.75 * (d2 * s2 if c else 0.0) for b, d1, d2, a, c in zip(DB, E1, E2, w1, w2)]


def test_dare_linear_normalize(tmp_path):
    got = merged_w(tmp_path, dare_doc(dare_models(tmp_path), "dare_linear", SEED, normalize=True))
    k1, k2 = dare_masks(SEED)
    s1, s2 = l1_scale(E1, k1), l1_scale(E2, k2)
    want = [
        b + ((d1 * s1 if keep1 else 0.0) + 0.75 * (d2 * s2 if keep2 else 0.0)) / 1.75
        for b, d1, d2, keep1, keep2 in zip(DB, E1, E2, k1, k2)
    ]
    assert close(got, want)


def test_dare_linear_model_index_without_base_listed(tmp_path):
    p = dare_models(tmp_path)
    doc = dare_doc(p, "dare_linear", SEED)
    doc["models"] = doc["models"][1:]  # now the experts are indices 0 and 1
    got = merged_w(tmp_path, doc)
    k1, k2 = dare_masks(SEED, indices=(0, 1))
    s1, s2 = l1_scale(E1, k1), l1_scale(E2, k2)
    want = [b + (d1 * s1 if a else 0.0) + 0.75 * (d2 * s2 if c else 0.0) for b, d1, d2, a, c in zip(DB, E1, E2, k1, k2)]
    assert close(got, want)


@pytest.mark.parametrize("seed", [SEED, 11])
def test_dare_ties(tmp_path, seed):
    got = merged_w(tmp_path, dare_doc(dare_models(tmp_path), "dare_ties", seed))
    k1, k2 = dare_masks(seed)
    s1, s2 = l1_scale(E1, k1), l1_scale(E2, k2)
    want = []
    for b, d1, d2, keep1, keep2 in zip(DB, E1, E2, k1, k2):
        v1 = 1.0 * (d1 * s1 if keep1 else 0.0)  # weight * rescaled kept delta
        v2 = 0.75 * (d2 * s2 if keep2 else 0.0)
        sign = 1.0 if v1 + v2 >= 0 else -1.0
        mixed = sum(v for v in (v1, v2) if v != 0 and math.copysign(1.0, v) == sign)
        want.append(b + mixed)  # dare_ties does not normalize by default
    assert close(got, want)


def test_dare_ties_normalized(tmp_path):
    got = merged_w(tmp_path, dare_doc(dare_models(tmp_path), "dare_ties", SEED, normalize=True, rescale=False))
    k1, k2 = dare_masks(SEED)
    want = []
    for b, d1, d2, keep1, keep2 in zip(DB, E1, E2, k1, k2):
        terms = [(1.0 * d1 if keep1 else 0.0, 1.0), (0.75 * d2 if keep2 else 0.0, 0.75)]
        sign = 1.0 if terms[0][0] + terms[1][0] >= 0 else -1.0
        agree = [(v, w) for v, w in terms if v != 0 and math.copysign(1.0, v) == sign]
        divisor = sum(w for _, w in agree) or 1.0
        want.append(b + sum(v for v, _ in agree) / divisor)
    assert close(got, want)


# -- DELLA -------------------------------------------------------------------------

DELLA_BASE = [[0.5, -1.0, 2.0, 0.0, 1.0], [0.25, 0.75, -0.5, 1.5, -2.0]]
DELLA_D1 = [[1.0, -3.0, 0.5, 2.0, -0.25], [-1.5, 0.5, 4.0, -2.5, 1.0]]
DELLA_D2 = [[-2.0, 1.0, 0.5, -1.0, 3.0], [2.0, -0.5, 1.0, 0.25, -3.5]]


def della_keep(deltas, density, epsilon, seed, index):
    """By hand: in each row, entry of ascending |delta| rank r (ties by position) of c is
    kept with probability (density - epsilon) + 2 epsilon r / (c - 1); the draw is the
    keyed stream's integer below p * 2**32."""
    cols = len(deltas[0])
    stream = rng.uint32_stream(rng.stream_key(seed, "m", index), 0, cols * len(deltas)).tolist()
    keep = []
    for row, values in enumerate(deltas):
        order = sorted(range(cols), key=lambda i: (abs(values[i]), i))
        rank = {i: r for r, i in enumerate(order)}
        for i in range(cols):
            p = torch.tensor(rank[i] / (cols - 1), dtype=torch.float32) * 2 * epsilon + (density - epsilon)  # float32, as mergekit
            keep.append(stream[row * cols + i] < float(p) * 2**32)
    return keep


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della(tmp_path, method):
    flat = lambda rows: [x for r in rows for x in r]  # noqa: E731
    dirs = {name: str(write_tensors(tmp_path / name, {"m": torch.tensor(
        [[b + d for b, d in zip(br, dr)] for br, dr in zip(DELLA_BASE, rows)] if rows else DELLA_BASE)}))
        for name, rows in (("base", None), ("m1", DELLA_D1), ("m2", DELLA_D2))}
    doc = {**F32, "merge_method": method, "base_model": dirs["base"], "seed": 3,
           "models": [{"model": dirs["m1"], "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.3}},
                      {"model": dirs["m2"], "parameters": {"weight": 0.5, "density": 0.4, "epsilon": 0.2}}]}
    got = flat(merge_doc(doc, tmp_path / "out")["m"].tolist())
    k1, k2 = della_keep(DELLA_D1, 0.5, 0.3, 3, 0), della_keep(DELLA_D2, 0.4, 0.2, 3, 1)
    d1, d2 = flat(DELLA_D1), flat(DELLA_D2)
    assert 0 < sum(k1) < 10 and 0 < sum(k2) < 10 and k1 != k2  # the draw keeps some and drops some
    v1 = [1.0 * d * l1_scale(d1, k1) if k else 0.0 for d, k in zip(d1, k1)]  # rescale is on by default
    v2 = [0.5 * d * l1_scale(d2, k2) if k else 0.0 for d, k in zip(d2, k2)]
    want = []
    for b, x, y in zip(flat(DELLA_BASE), v1, v2):
        if method == "della_linear":  # a weighted sum, not normalized by default
            want.append(b + x + y)
            continue
        sign = 1.0 if x + y >= 0 else -1.0  # della: TIES sign election, normalized by the agreeing weights
        agree = [(v, w) for v, w in ((x, 1.0), (y, 0.5)) if v != 0 and math.copysign(1.0, v) == sign]
        want.append(b + sum(v for v, _ in agree) / (sum(w for _, w in agree) or 1.0))
    assert close(got, want)


def test_della_refuses_an_epsilon_that_leaves_0_1(tmp_path):
    p = models(tmp_path, base=[0.0] * 4, m1=[1.0, -2.0, 3.0, 0.5])
    with pytest.raises(UserInputError, match="density \\+- epsilon must lie in"):
        merged_w(tmp_path, {"merge_method": "della", "base_model": p["base"],
                            "models": [{"model": p["m1"], "parameters": {"weight": 1.0, "density": 0.9, "epsilon": 0.15}}]})


def test_ties_rescale_and_at_least_one_entry_kept(tmp_path):
    """ties with mergekit's rescale: the kept entries times sum|delta| / sum|kept|; and a
    density whose int(density * n) is 0 keeps the largest entry (mergekit keeps one)."""
    d1, d2 = [1.0, -3.0, 0.5, 2.0], [-0.5, 2.0, 1.5, -1.0]
    p = models(tmp_path, base=[0.0] * 4, m1=d1, m2=d2)
    doc = {"merge_method": "ties", "base_model": p["base"], "parameters": {"rescale": True},
           "models": [{"model": p["m1"], "parameters": {"weight": 1.0, "density": 0.5}},
                      {"model": p["m2"], "parameters": {"weight": 1.0, "density": 0.1}}]}
    got = merged_w(tmp_path, doc)
    k1 = [False, True, False, True]  # the 2 largest of |d1|: 3 and 2
    k2 = [False, True, False, False]  # int(0.4) = 0, so the one largest: 2
    v1 = [d * l1_scale(d1, k1) if k else 0.0 for d, k in zip(d1, k1)]  # x 6.5 / 5
    v2 = [d * l1_scale(d2, k2) if k else 0.0 for d, k in zip(d2, k2)]  # x 5 / 2
    assert close(v1, [0.0, -3.9, 0.0, 2.6]) and v2 == [0.0, 5.0, 0.0, 0.0]
    # signs: -3.9 + 5 > 0 elects +, so index 1 is 5 / 1; index 3 is 2.6 / 1
    assert close(got, [0.0, 5.0, 0.0, 2.6])


def test_parameters_mergekit_ignores_are_accepted_with_one_warning(tmp_path):
    from conftest import run_cli

    p = models(tmp_path, base=[0.0, 1.0], m1=[1.0, 3.0])
    recipe = {"merge_method": "task_arithmetic", "base_model": p["base"], "parameters": {"rescale": True},
              "models": [{"model": p["m1"], "parameters": {"weight": 0.5, "density": 0.3}}]}
    (tmp_path / "r.json").write_text(__import__("json").dumps(recipe))
    proc = run_cli("merge", tmp_path / "r.json", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: density, rescale: no effect on task_arithmetic (accepted, as mergekit accepts it)"]
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "out" / "model.safetensors"))["w"].tolist() == [0.5, 2.0]  # nothing dropped


# -- NearSwap and SCE -------------------------------------------------------------------

def test_nearswap(tmp_path):
    p = models(tmp_path, base=[0.0, 1.0, 2.0, -1.0], m=[0.25, 3.0, 2.0, -1.5])
    got = merged_w(tmp_path, {"merge_method": "nearswap", "base_model": p["base"], "parameters": {"t": 0.5},
                              "models": [{"model": p["m"]}]})
    # |base - m| = 0.25, 2, 0 (counted as 1e-6), 0.5: weights on m min(1, 0.5 / d) = 1, 0.25, 1, 1
    assert got == [0.25, 0.25 * 3.0 + 0.75 * 1.0, 2.0, -1.5]


SCE_TV = [[1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 0.25, 2.0],
          [2.0, 1.0, -0.5, 0.0, 1.0, -1.0, 0.25, -2.0],
          [-1.0, -1.0, 0.5, 0.0, 2.0, 1.0, 0.25, 1.0]]


def sce_by_hand(base, tvs, fraction):
    n, size = len(tvs), len(base)
    if fraction < 1:
        var = [sum((tv[i] - sum(t[i] for t in tvs) / n) ** 2 for tv in tvs) / n for i in range(size)]
        k = int(sum(v != 0 for v in var) * fraction)
        kept = sorted(range(size), key=lambda i: (-var[i], i))[:k]  # ties by position
        tvs = [[x if i in kept else 0.0 for i, x in enumerate(tv)] for tv in tvs]
    squares = [sum(x * x for x in tv) / size for tv in tvs]
    weights = [q / sum(squares) for q in squares]
    out = []
    for i in range(size):
        sign = 1.0 if sum(tv[i] for tv in tvs) >= 0 else -1.0
        agree = [(tv[i], w) for tv, w in zip(tvs, weights) if tv[i] != 0 and math.copysign(1.0, tv[i]) == sign]
        out.append(base[i] + sum(x * w for x, w in agree) / max(sum(w for _, w in agree), 1e-6))
    return out


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_sce(tmp_path, fraction):
    base = [0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 0.25, 1.5]
    p = models(tmp_path, base=base, **{f"m{j}": [b + d for b, d in zip(base, tv)] for j, tv in enumerate(SCE_TV)})
    got = merged_w(tmp_path, {"merge_method": "sce", "base_model": p["base"], "parameters": {"select_topk": fraction},
                              "models": [{"model": p[f"m{j}"]} for j in range(3)]})
    want = sce_by_hand(base, SCE_TV, fraction)
    assert close(got, want)
    if fraction < 1:  # the selection dropped something that mattered
        assert not close(want, sce_by_hand(base, SCE_TV, 1.0))


# -- NuSLERP, Multi-SLERP, Karcher ------------------------------------------------------

def slerp_by_hand(t, a, b):
    """Spherical interpolation of two vectors (lists), the straight line when (anti)parallel."""
    cos = sum(x * y for x, y in zip(a, b)) / (math.hypot(*a) * math.hypot(*b))
    if 1 - cos * cos <= 1e-16:
        return [(1 - t) * x + t * y for x, y in zip(a, b)]
    theta = math.acos(cos)
    return [(math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta) for x, y in zip(a, b)]


def test_nuslerp_per_row_per_column_and_whole_with_a_base(tmp_path):
    a = [[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]]
    b = [[0.0, 1.0, 1.0], [1.0, 2.0, -2.0]]
    base = [[0.25, 0.5, -0.5], [0.0, 1.0, 0.5]]
    dirs = {n: str(write_tensors(tmp_path / n, {"m": torch.tensor(v)})) for n, v in (("a", a), ("b", b), ("base", base))}

    def run(params, with_base=False):
        doc = {**F32, "merge_method": "nuslerp", "parameters": params,
               "models": [{"model": dirs["a"], "parameters": {"weight": 1.0}}, {"model": dirs["b"], "parameters": {"weight": 3.0}}]}
        if with_base:
            doc["base_model"] = dirs["base"]
        return merge_doc(doc, tmp_path / f"out-{len(list(tmp_path.iterdir()))}")["m"].tolist()

    t = 3.0 / 4.0
    rows = [slerp_by_hand(t, ra, rb) for ra, rb in zip(a, b)]
    assert all(close(g, w) for g, w in zip(run({"nuslerp_flatten": False}), rows))
    columns = [slerp_by_hand(t, [r[j] for r in a], [r[j] for r in b]) for j in range(3)]
    got = run({"nuslerp_flatten": False, "nuslerp_row_wise": True})
    assert all(close([got[i][j] for i in range(2)], columns[j]) for j in range(3))
    flat = lambda m: [x for r in m for x in r]  # noqa: E731
    tv = slerp_by_hand(t, [x - y for x, y in zip(flat(a), flat(base))], [x - y for x, y in zip(flat(b), flat(base))])
    assert close(flat(run({}, with_base=True)), [x + y for x, y in zip(tv, flat(base))])
    assert not close(flat(run({"nuslerp_flatten": False})), flat(run({})))  # per row is not whole


def test_multislerp_by_hand(tmp_path):
    xs = [[1.0, 0.0, 0.5], [0.0, 2.0, 0.0], [-0.5, 0.5, 1.5]]
    ws = [1.0, 2.0, 1.0]
    p = models(tmp_path, **{f"m{i}": x for i, x in enumerate(xs)})
    got = merged_w(tmp_path, {"merge_method": "multislerp",
                              "models": [{"model": p[f"m{i}"], "parameters": {"weight": w}} for i, w in enumerate(ws)]})
    w = [x / sum(ws) for x in ws]
    eps = 1e-8
    norms = [math.hypot(*x) for x in xs]
    units = [[v / (n + eps) for v in x] for x, n in zip(xs, norms)]
    mean = [sum(wi * u[k] for wi, u in zip(w, units)) for k in range(3)]
    mean = [m / math.hypot(*mean) for m in mean]
    tangents = [[u[k] - sum(a * b for a, b in zip(u, mean)) * mean[k] for k in range(3)] for u in units]
    tangent = [sum(wi * tg[k] for wi, tg in zip(w, tangents)) for k in range(3)]
    size = math.hypot(*tangent) + eps
    scale = sum(n * wi for n, wi in zip(norms, w))
    want = [(mean[k] * math.cos(size) + tangent[k] * math.sin(size) / size) * scale for k in range(3)]
    assert close(got, want)


def test_karcher_mean_of_orthogonal_directions_is_their_diagonal(tmp_path):
    """By symmetry, the Karcher mean of e1, 2 e2 and 3 e3 (equal weights) points along
    (1, 1, 1), with the mean norm 2; and that of two directions is their midpoint."""
    p = models(tmp_path, a=[1.0, 0.0, 0.0], b=[0.0, 2.0, 0.0], c=[0.0, 0.0, 3.0])
    got = merged_w(tmp_path, {"merge_method": "karcher", "parameters": {"max_iter": 50, "tol": 1e-9},
                              "models": [{"model": p[n]} for n in "abc"]})
    assert close(got, [2 / math.sqrt(3)] * 3, rel=1e-5, abs_=1e-5)
    got = merged_w(tmp_path / "pair", {"merge_method": "karcher", "models": [{"model": p["a"]}, {"model": p["b"]}]})
    assert close(got, [1.5 / math.sqrt(2), 1.5 / math.sqrt(2), 0.0], rel=1e-5, abs_=1e-5)


# -- RAM -----------------------------------------------------------------------------

RAM_BASE = [0.5, -1.0, 2.0, 0.0, 1.0]
RAM_TV = [[1.0, 0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.5, 1.0], [0.0, 0.0, -1.0, 0.0, 0.0]]


def ram_doc(tmp_path, method, params):
    p = models(tmp_path, base=RAM_BASE, **{f"m{j}": [b + d for b, d in zip(RAM_BASE, tv)] for j, tv in enumerate(RAM_TV)})
    return {"merge_method": method, "base_model": p["base"], "parameters": params, "models": [{"model": p[f"m{j}"]} for j in range(3)]}


def test_ram(tmp_path):
    # changes per entry: 1 (m0), 0, 3, 1 (m1), 2: unique ones kept whole, shared ones averaged
    got = merged_w(tmp_path, ram_doc(tmp_path, "ram", {}))
    assert close(got, [b + d for b, d in zip(RAM_BASE, [1.0, 0.0, (2.0 + 3.0 - 1.0) / 3, 0.5, (-1.0 + 1.0) / 2])])


@pytest.mark.parametrize("alpha, scale", [(0.2, 1.1), (5.0, 2.0)])
def test_ramplus_tl(tmp_path, alpha, scale):
    """m0 and m1 each change 1 entry alone and 2 with others: rho = 2, scale 1 + 0.5 min(2, alpha)."""
    got = merged_w(tmp_path, ram_doc(tmp_path, "ramplus_tl", {"r": 0.5, "alpha": alpha}))
    assert close(got, [b + d for b, d in zip(RAM_BASE, [1.0 * scale, 0.0, 4.0 / 3, 0.5 * scale, 0.0])])


# -- breadcrumbs -------------------------------------------------------------------

# m1: gamma 0.125 -> drop int(1) largest; density 0.5 -> keep the next int(4).
#     |D1| ranks: 4 (i3) dropped; keep 3 (i0), 2.5 (i6), 2 (i2), 1.5 (i5)
BC1 = [3.0, 0.0, 2.0, 0.0, 0.0, 1.5, -2.5, 0.0]
# m2: gamma 0.25 -> drop 2; density 0.25 -> keep 2. |D2| = [2, 1, 4, 1, 4, .5, 1, 2]:
#     drop 4 (i2), 4 (i4); keep 2 (i0), 2 (i7)
BC2 = [-2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]


def breadcrumbs_doc(p, method):
    return {
        "merge_method": method,
        "base_model": p["base"],
        "models": [
            {"model": p["m1"], "parameters": {"weight": 1.0, "density": 0.5, "gamma": 0.125}},
            {"model": p["m2"], "parameters": {"weight": 0.5, "density": 0.25, "gamma": 0.25}},
        ],
    }


def test_breadcrumbs(tmp_path):
    got = merged_w(tmp_path, breadcrumbs_doc(ties_models(tmp_path), "breadcrumbs"))
    assert got == [b + x + 0.5 * y for b, x, y in zip(TB, BC1, BC2)]
    assert got == [3.0, -1.0, 2.5, 2.0, 0.0, 2.5, -3.0, 4.0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_breadcrumbs_in_other_compute_dtypes(tmp_path, dtype):
    got = merged_w(tmp_path, {**breadcrumbs_doc(ties_models(tmp_path), "breadcrumbs"), "dtype": dtype, "out_dtype": "float32"})
    assert got == [3.0, -1.0, 2.5, 2.0, 0.0, 2.5, -3.0, 4.0]


def test_breadcrumbs_ties(tmp_path):
    got = merged_w(tmp_path, breadcrumbs_doc(ties_models(tmp_path), "breadcrumbs_ties"))
    # weighted: [3,0,2,0,0,1.5,-2.5,0] and [-1,0,0,0,0,0,0,1]; sum [2,0,2,0,0,1.5,-2.5,1]
    # elected + except i6; at i0 m2's -1 disagrees and is dropped. No normalization by default.
    assert got == [b + m for b, m in zip(TB, [3.0, 0.0, 2.0, 0.0, 0.0, 1.5, -2.5, 1.0])]


def test_breadcrumbs_fewer_dropped_to_meet_density(tmp_path):
    p = ties_models(tmp_path)
    got = merged_w(tmp_path, {
        "merge_method": "breadcrumbs",
        "base_model": p["base"],
        "models": [{"model": p["m1"], "parameters": {"weight": 1.0, "density": 0.875, "gamma": 0.25}}],
    })
    # keep int(0.875*8) = 7; dropping int(0.25*8) = 2 would leave 6, so only the largest (i3) goes
    assert got == [b + d for b, d in zip(TB, [3.0, -1.0, 2.0, 0.0, 0.5, 1.5, -2.5, 0.25])]


# -- SLERP -------------------------------------------------------------------------


def slerp_expected(a, b, t):
    dot = sum(x * y for x, y in zip(a, b))
    cos = dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    theta = math.acos(cos)
    s0 = math.sin((1 - t) * theta) / math.sin(theta)
    s1 = math.sin(t * theta) / math.sin(theta)
    return [s0 * x + s1 * y for x, y in zip(a, b)], cos


def slerp_merge(tmp_path, a, b, t):
    p = models(tmp_path, base=a, other=b)
    return merged_w(tmp_path, {"merge_method": "slerp", "base_model": p["base"], "models": [{"model": p["other"]}], "parameters": {"t": t}})


def test_slerp(tmp_path):
    a, b, t = [1.0, 2.0, -1.0, 0.5], [0.5, -1.0, 2.0, 3.0], 0.3
    want, cos = slerp_expected(a, b, t)
    got = slerp_merge(tmp_path, a, b, t)
    assert abs(cos) < 0.9995
    assert close(got, want, rel=1e-6, abs_=1e-6)
    assert not close(got, [(1 - t) * x + t * y for x, y in zip(a, b)], rel=1e-3, abs_=1e-3)


def test_slerp_near_threshold_still_spherical(tmp_path):
    a = [1.0, 2.0, -1.0, 0.5]
    b = [3.0 * x for x in a]
    b[0] += 0.5  # cos about 0.9982: under the threshold
    want, cos = slerp_expected(a, b, 0.7)
    assert 0.998 < cos < 0.9995
    got = slerp_merge(tmp_path, a, b, 0.7)
    assert close(got, want, rel=1e-6, abs_=1e-6)
    assert not close(got, [0.3 * x + 0.7 * y for x, y in zip(a, b)], rel=1e-5, abs_=1e-5)


def test_slerp_just_over_threshold_is_linear(tmp_path):
    a = [1.0, 2.0, -1.0, 0.5]
    b = [3.0 * x for x in a]
    b[0] += 0.1  # cos about 0.99993: over the threshold
    spherical, cos = slerp_expected(a, b, 0.7)
    assert 0.9995 < cos < 1
    got = slerp_merge(tmp_path, a, b, 0.7)
    linear = [(1 - 0.7) * x + 0.7 * y for x, y in zip(a, b)]
    assert close(got, linear, rel=1e-6, abs_=1e-6)
    assert not close(got, spherical, rel=1e-6, abs_=1e-6)


@pytest.mark.parametrize("factor", [2.0, -1.0, 1.0])
def test_slerp_colinear_falls_back_to_lerp(tmp_path, factor):
    a, t = [1.0, 2.0, -1.0, 0.5], 0.25
    b = [factor * x for x in a]  # |cos| = 1 > 0.9995: the spherical formula would be 0/0
    got = slerp_merge(tmp_path, a, b, t)
    assert got == [(1 - t) * x + t * y for x, y in zip(a, b)]


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_slerp_endpoints(tmp_path, t):
    a, b = [1.0, 2.0, -1.0, 0.5], [0.5, -1.0, 2.0, 3.0]
    assert close(slerp_merge(tmp_path, a, b, t), a if t == 0 else b, rel=1e-6, abs_=1e-6)


# -- Model Stock -------------------------------------------------------------------


def model_stock_expected(base, tuned):
    n = len(tuned)
    offsets = [[x - b for x, b in zip(m, base)] for m in tuned]
    norm = [math.sqrt(sum(x * x for x in o)) for o in offsets]
    cosines = [
        sum(x * y for x, y in zip(offsets[i], offsets[j])) / (norm[i] * norm[j])
        for i in range(n) for j in range(i + 1, n)
    ]
    cos = sum(cosines) / len(cosines)
    t = n * cos / (1 + (n - 1) * cos)
    average = [sum(col) / n for col in zip(*tuned)]
    return [t * w + (1 - t) * b for w, b in zip(average, base)], t


def test_model_stock(tmp_path):
    base = [0.5, -1.0, 2.0, 0.0, 1.0, -0.5]
    offsets = [[1.0, 0.5, -0.5, 1.0, 0.0, 0.25], [0.5, 1.0, 0.0, 0.5, -0.5, 0.25], [1.0, 0.0, -1.0, 0.5, 0.5, 0.0]]
    tuned = [[b + o for b, o in zip(base, off)] for off in offsets]
    p = models(tmp_path, base=base, m0=tuned[0], m1=tuned[1], m2=tuned[2])
    got = merged_w(tmp_path, {
        "merge_method": "model_stock",
        "base_model": p["base"],
        "models": [{"model": p["base"]}, {"model": p["m0"]}, {"model": p["m1"]}, {"model": p["m2"]}],
    })
    want, t = model_stock_expected(base, tuned)
    assert 0.1 < t < 0.99  # neither endpoint: the ratio matters
    assert close(got, want, rel=1e-6, abs_=1e-6)


def test_model_stock_filter_wise(tmp_path):
    base = [[0.5, -1.0, 2.0], [0.0, 1.0, -0.5]]
    o1 = [[1.0, 0.5, -0.5], [1.0, 0.0, 0.25]]
    o2 = [[0.5, 1.0, 0.0], [-0.5, 0.75, 0.25]]
    tuned = [[[b + o for b, o in zip(br, orow)] for br, orow in zip(base, off)] for off in (o1, o2)]
    dirs = {
        name: str(write_tensors(tmp_path / name, {"m": torch.tensor(v, dtype=torch.float32)}))
        for name, v in (("base", base), ("m0", tuned[0]), ("m1", tuned[1]))
    }
    doc = {
        **F32,
        "merge_method": "model_stock",
        "base_model": dirs["base"],
        "models": [{"model": dirs["m0"]}, {"model": dirs["m1"]}],
        "parameters": {"filter_wise": True},
    }
    got = merge_doc(doc, tmp_path / "out")["m"].tolist()
    ratios = []
    for r in range(2):  # one ratio per row
        want, t = model_stock_expected(base[r], [tuned[0][r], tuned[1][r]])
        ratios.append(t)
        assert close(got[r], want, rel=1e-6, abs_=1e-6)
    assert abs(ratios[0] - ratios[1]) > 0.1
    whole = merge_doc({**doc, "parameters": {"filter_wise": False}}, tmp_path / "out2")["m"].tolist()
    want_whole, _ = model_stock_expected(sum(base, []), [sum(tuned[0], []), sum(tuned[1], [])])
    assert close(sum(whole, []), want_whole, rel=1e-6, abs_=1e-6)


@pytest.mark.parametrize("nudge", [0.0, 2**-20])
def test_model_stock_keeps_the_base_where_the_ratio_is_singular(tmp_path, nudge):
    """Experts e and 2*base - e: cos = -1, so 1 + (N-1) cos = 0 and the ratio N cos / 0
    is infinite (NaN written before); with one entry nudged by 2**-20, 1 + cos is
    about 1e-13 (-8388608 written before). Either way the tensor keeps the base; the 2-D tensor
    beside it, whose experts agree, is merged as usual."""
    base = [0.5, -1.0, 2.0, 0.25]
    e = [1.5, -0.5, 1.0, 0.25]
    mirror = [2 * b - x for b, x in zip(base, e)]
    mirror[0] += nudge
    fine_base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    fine = [fine_base + torch.tensor([[0.5, 0.25], [0.0, 0.5]]), fine_base + torch.tensor([[0.25, 0.5], [0.5, 0.0]])]
    dirs = {name: str(write_tensors(tmp_path / name, {"w": vec(w), "m": m}))
            for name, w, m in (("base", base, fine_base), ("e", e, fine[0]), ("mirror", mirror, fine[1]))}
    out = merge_doc({**F32, "merge_method": "model_stock", "base_model": dirs["base"],
                     "models": [{"model": dirs["e"]}, {"model": dirs["mirror"]}]}, tmp_path / "out")
    assert out["w"].tolist() == base
    want, t = model_stock_expected(sum(fine_base.tolist(), []), [sum(f.tolist(), []) for f in fine])
    assert 0.1 < t < 0.99 and close(out["m"].reshape(-1).tolist(), want)


def test_a_merge_that_produces_inf_exits_1_and_writes_nothing(tmp_path):
    """Finite float32 inputs whose average overflows float16: one error line naming the
    tensor, exit 1, no output directory (whatever the method; the cast is the engine's)."""
    from conftest import run_cli

    p = models(tmp_path, a=[1.0, 7.0e4], b=[1.0, 8.0e4])
    (tmp_path / "r.yaml").write_text(
        f"merge_method: linear\nout_dtype: float16\nparameters: {{weight: 1.0}}\nmodels:\n  - model: {p['a']}\n  - model: {p['b']}\n")
    proc = run_cli("merge", tmp_path / "r.yaml", "--out", tmp_path / "out")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: linear produced NaN or Inf values in tensor w; nothing was written"]
    assert not (tmp_path / "out").exists()


# -- dtypes ------------------------------------------------------------------------


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_without_a_dtype_the_output_keeps_the_inputs_dtype_and_the_math_is_float32(tmp_path, stored):
    """As mergekit writes it: bf16 in, bf16 out. The average of 1 and 1 + 2**-8 is
    1 + 2**-9 in float32, which bf16 rounds to 1 (ties to even) and float16 keeps; a
    bf16 sum would round 2 + 2**-8 to 2 first."""
    a = torch.tensor([1.0, 3.0], dtype=stored)
    b = torch.tensor([1.0 + 2**-8, 5.0], dtype=stored)
    dirs = {n: str(write_tensors(tmp_path / n, {"w": t})) for n, t in (("a", a), ("b", b))}
    out = merge_doc({"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [{"model": dirs["a"]}, {"model": dirs["b"]}]},
                    tmp_path / "out")
    assert out["w"].dtype == stored
    assert out["w"].tolist() == [torch.tensor(1 + 2**-9).to(stored).item(), 4.0]


def test_out_dtype_is_applied_after_float32_math(tmp_path):
    p = models(tmp_path, a=[1.0, 2.0, 3.0], b=[2.0, 2.0, 2.0 + 2**-12])
    out = merge_doc({
        "merge_method": "linear", "dtype": "float32", "out_dtype": "float16",
        "models": [{"model": p["a"], "parameters": {"weight": 1.0}}, {"model": p["b"], "parameters": {"weight": 1.0}}],
    }, tmp_path / "out")
    assert out["w"].dtype == torch.float16
    # (3 + (2 + 2**-12)) / 2 = 2.5 + 2**-13 in float32; float16's step at 2.5 is 2**-9
    assert out["w"].tolist() == [1.5, 2.0, 2.5]


# -- Arcee Fusion ----------------------------------------------------------------------

def test_arcee_fusion_by_hand(tmp_path):
    """importance = |m - b| x the row's KL(softmax(m) || softmax(b)); kept where it reaches
    median + 1.5 IQR of the sorted importances (at floor(q (n - 1))); else the base's."""
    base = [[0.0, 0.5, -0.5, 1.0], [0.25, 0.0, 0.5, -1.0], [1.0, 1.0, 1.0, 1.0]]
    model = [[0.1, 0.5, -0.5, 3.0], [0.25, 0.05, 0.5, -1.0], [1.0, 1.2, 1.0, 1.0]]
    dirs = {n: str(write_tensors(tmp_path / n, {"m": torch.tensor(v)})) for n, v in (("base", base), ("model", model))}
    got = merge_doc({**F32, "merge_method": "arcee_fusion", "base_model": dirs["base"], "models": [{"model": dirs["model"]}]},
                    tmp_path / "out")["m"].tolist()

    def softmax(row):
        e = [math.exp(x - max(row)) for x in row]
        return [v / sum(e) + 1e-8 for v in e]

    importance = []
    for b, m in zip(base, model):
        p, q = softmax(m), softmax(b)
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        importance.append([abs(x - y) * kl for x, y in zip(m, b)])
    flat = sorted(v for row in importance for v in row)
    q1, median, q3 = (flat[math.floor(q * (len(flat) - 1))] for q in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    want = [[m if i >= threshold else b for b, m, i in zip(br, mr, ir)] for br, mr, ir in zip(base, model, importance)]
    assert want != base and want != model  # some entries taken, some not
    assert all(close(g, w) for g, w in zip(got, want))


def test_a_weight_on_a_method_that_weighs_no_model_is_accepted_with_a_warning(tmp_path):
    """mergekit reads only what a method declares, so its sce or karcher recipes often
    carry weights: accepted, named in one warning, changing nothing."""
    from hivemerge.merge.recipe import validate_recipe

    p = models(tmp_path, base=[0.0, 1.0], m1=[1.0, 3.0], m2=[2.0, -1.0])
    doc = {"merge_method": "sce", "base_model": p["base"], "models": [{"model": p["m1"]}, {"model": p["m2"]}]}
    weighted = {**doc, "models": [{"model": m["model"], "parameters": {"weight": 0.3}} for m in doc["models"]]}
    assert validate_recipe(weighted).warnings == ["weight: no effect on sce (accepted, as mergekit accepts it)"]
    assert validate_recipe(doc).warnings == []
    assert merged_w(tmp_path / "a", weighted) == merged_w(tmp_path / "b", doc)
