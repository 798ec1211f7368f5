"""Robust aggregation methods (median, trimmed_mean, centered_clip) on tiny tensors,
merged through the real path (recipe validation, the streaming engine, safetensors
output) and checked against values worked out by hand in the comments.

Each model directory holds one tensor ``w``; deltas are relative to the base ``B``.
Dyadic values (multiples of 1/8) keep most results exact in float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import merge_doc, write_tensors

from hivemerge.merge.recipe import validate_recipe
from hivemerge.protocol.errors import UserInputError

F32 = {"dtype": "float32", "out_dtype": "float32"}
B = [1.0, -1.0, 0.5, 2.0]


def model_dirs(tmp_path, deltas: dict[str, list[float]], base: list[float] = B) -> dict[str, str]:
    """The base and one expert per delta (expert = base + delta), as model directories."""
    paths = {"base": str(write_tensors(tmp_path / "base", {"w": torch.tensor(base, dtype=torch.float32)}))}
    for name, d in deltas.items():
        values = torch.tensor([b + x for b, x in zip(base, d)], dtype=torch.float32)
        paths[name] = str(write_tensors(tmp_path / name, {"w": values}))
    return paths


def merged(tmp_path, method: str, paths: dict[str, str], names: list[str], **params) -> list[float]:
    document = {
        **F32, "merge_method": method, "base_model": paths["base"],
        "models": [{"model": paths[n]} for n in names],
    }
    if params:
        document["parameters"] = params
    out = merge_doc(document, tmp_path / f"out-{method}-{len(list(tmp_path.glob('out-*')))}")
    return out["w"].tolist()


def close(got, want, tol=1e-6) -> bool:
    return len(got) == len(want) and all(math.isclose(g, w, rel_tol=tol, abs_tol=tol) for g, w in zip(got, want))


def plus_base(delta: list[float]) -> list[float]:
    return [b + d for b, d in zip(B, delta)]


# -- median -------------------------------------------------------------------------

D1 = [1.0, 0.0, -2.0, 0.5]
D2 = [3.0, -1.0, 0.0, 0.25]
D3 = [2.0, 4.0, -1.0, -8.0]
OUTLIER = [1000.0, -1000.0, 1000.0, 1000.0]


def test_median_of_an_odd_count(tmp_path):
    p = model_dirs(tmp_path, {"a": D1, "b": D2, "c": D3})
    # per coordinate: median(1, 3, 2) = 2; median(0, -1, 4) = 0; median(-2, 0, -1) = -1; median(.5, .25, -8) = .25
    assert merged(tmp_path, "median", p, ["a", "b", "c"]) == plus_base([2.0, 0.0, -1.0, 0.25])


def test_median_of_an_even_count_averages_the_middle_pair(tmp_path):
    p = model_dirs(tmp_path, {"a": D1, "b": D2, "c": D3, "x": OUTLIER})
    # sorted per coordinate, mean of the 2nd and 3rd:
    #   (1, 2, 3, 1000) -> 2.5; (-1000, -1, 0, 4) -> -0.5; (-2, -1, 0, 1000) -> -0.5; (-8, .25, .5, 1000) -> .375
    assert merged(tmp_path, "median", p, ["a", "b", "c", "x"]) == plus_base([2.5, -0.5, -0.5, 0.375])


def test_median_ignores_a_minority_outlier_and_applies_lambda(tmp_path):
    p = model_dirs(tmp_path, {"a": D1, "b": D2, "x": OUTLIER, "c": D3, "d": D1})
    # five deltas per coordinate: (1, 3, 1000, 2, 1) -> 2; (0, -1, -1000, 4, 0) -> 0;
    # (-2, 0, 1000, -1, -2) -> -1; (.5, .25, 1000, -8, .5) -> .5; times lambda 0.5
    got = merged(tmp_path, "median", p, ["a", "b", "x", "c", "d"], **{"lambda": 0.5})
    assert got == plus_base([1.0, 0.0, -0.5, 0.25])


def test_median_does_not_depend_on_model_order(tmp_path):
    p = model_dirs(tmp_path, {"a": D1, "b": D2, "c": D3, "x": OUTLIER})
    first = merged(tmp_path, "median", p, ["a", "b", "c", "x"])
    assert merged(tmp_path, "median", p, ["x", "c", "a", "b"]) == first


def test_the_base_listed_among_models_is_not_a_task_vector(tmp_path):
    p = model_dirs(tmp_path, {"a": D1, "b": D2, "c": D3})
    # the base adds no zero delta: still the median of three, not of four
    assert merged(tmp_path, "median", p, ["base", "a", "b", "c"]) == plus_base([2.0, 0.0, -1.0, 0.25])


# -- trimmed mean -------------------------------------------------------------------

T = {
    "a": [1.0, 10.0, -4.0, 0.0],
    "b": [2.0, -10.0, 4.0, 0.0],
    "c": [3.0, 0.5, 0.0, 0.0],
    "d": [4.0, 0.25, 1.0, 0.0],
    "e": [100.0, 0.75, 2.0, 8.0],
}


def test_trimmed_mean_drops_the_extremes_per_coordinate(tmp_path):
    p = model_dirs(tmp_path, T)
    # n = 5, trim 0.2 -> k = int(0.2 * 5) = 1 dropped at each end, mean of the middle three:
    #   (2, 3, 4) -> 3; (.25, .5, .75) -> .5; (0, 1, 2) -> 1; (0, 0, 0) -> 0
    assert merged(tmp_path, "trimmed_mean", p, list(T), trim=0.2) == plus_base([3.0, 0.5, 1.0, 0.0])


def test_trimmed_mean_default_trim_is_a_fifth(tmp_path):
    p = model_dirs(tmp_path, T)
    assert merged(tmp_path, "trimmed_mean", p, list(T)) == plus_base([3.0, 0.5, 1.0, 0.0])


def test_trimmed_mean_without_trim_is_the_mean(tmp_path):
    p = model_dirs(tmp_path, T)
    # (1+2+3+4+100)/5 = 22; (10-10+.5+.25+.75)/5 = .3; (-4+4+0+1+2)/5 = .6; 8/5 = 1.6
    got = merged(tmp_path, "trimmed_mean", p, list(T), trim=0.0)
    assert close(got, plus_base([22.0, 0.3, 0.6, 1.6]))


def test_trimmed_mean_always_keeps_the_middle(tmp_path):
    p = model_dirs(tmp_path, {k: T[k] for k in "abcd"})
    # n = 4, trim 0.5: int(2) is capped at (n - 1) // 2 = 1, so the middle two remain:
    #   (1, 2, 3, 4) -> 2.5; (-10, .25, .5, 10) -> .375; (-4, 0, 1, 4) -> .5; 0
    got = merged(tmp_path, "trimmed_mean", p, list("abcd"), trim=0.5, **{"lambda": 2.0})
    assert got == plus_base([5.0, 0.75, 1.0, 0.0])


# -- centered clip ------------------------------------------------------------------

C = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [10.0, 0.0]}
CB = [0.5, -0.5]


def cclip_reference(deltas: list[list[float]], tau: float, iterations: int) -> list[float]:
    """Centered clipping in plain Python: start at the coordinate-wise median, then move by
    the mean of the deltas' offsets, each clipped to L2 norm tau."""
    center = [sorted(col)[len(col) // 2] for col in zip(*deltas)]
    for _ in range(iterations):
        steps = []
        for d in deltas:
            diff = [x - c for x, c in zip(d, center)]
            norm = math.sqrt(sum(x * x for x in diff))
            scale = min(1.0, tau / norm) if norm > 0 else 1.0
            steps.append([x * scale for x in diff])
        center = [c + sum(col) / len(steps) for c, col in zip(center, zip(*steps))]
    return center


def test_centered_clip_one_iteration_by_hand(tmp_path):
    p = model_dirs(tmp_path, C, base=CB)
    # median = [1, 0]; offsets: a [0, 0] (kept), b [-1, 1] (norm sqrt2 -> scaled by 1/sqrt2),
    # c [9, 0] (norm 9 -> scaled by 1/9 = [1, 0]); centre += mean = [(1 - 1/sqrt2)/3, (1/sqrt2)/3]
    s = 1 / math.sqrt(2)
    want = [1 + (1 - s) / 3, s / 3]
    got = merged(tmp_path, "centered_clip", p, list(C), tau=1.0, iterations=1)
    assert close(got, [b + w for b, w in zip(CB, want)])
    assert close(want, cclip_reference(list(C.values()), 1.0, 1), tol=1e-12)
    # the outlier moved the centre by 1/3 along x, not by 3 as a plain mean would
    assert got[0] - CB[0] < 1.2


def test_centered_clip_several_iterations(tmp_path):
    p = model_dirs(tmp_path, C, base=CB)
    want = cclip_reference(list(C.values()), 1.0, 3)
    got = merged(tmp_path, "centered_clip", p, list(C))  # defaults: tau 1, 3 iterations
    assert close(got, [b + w for b, w in zip(CB, want)], tol=1e-5)
    # a different radius gives a different answer
    assert not close(got, [b + w for b, w in zip(CB, cclip_reference(list(C.values()), 2.0, 3))], tol=1e-3)


def test_centered_clip_with_a_wide_radius_is_the_mean(tmp_path):
    p = model_dirs(tmp_path, C, base=CB)
    # no offset is clipped: median + mean(d - median) = mean(d) = [11/3, 1/3]
    got = merged(tmp_path, "centered_clip", p, list(C), tau=100.0, iterations=1)
    assert close(got, [CB[0] + 11 / 3, CB[1] + 1 / 3])


# -- validation ---------------------------------------------------------------------

@pytest.mark.parametrize("method, params, message", [
    ("trimmed_mean", {"trim": 0.6}, "parameters.trim"),
    ("centered_clip", {"tau": 0.0}, "parameters.tau"),
    ("centered_clip", {"iterations": 0}, "parameters.iterations"),
    ("median", {"density": 0.5}, "density"),
])
def test_robust_parameters_are_validated(tmp_path, method, params, message):
    p = model_dirs(tmp_path, {"a": D1, "b": D2})
    document = {**F32, "merge_method": method, "base_model": p["base"],
                "models": [{"model": p["a"]}, {"model": p["b"]}], "parameters": params}
    with pytest.raises(UserInputError) as info:
        validate_recipe(document)
    assert message in str(info.value)


def test_robust_methods_need_a_base(tmp_path):
    p = model_dirs(tmp_path, {"a": D1, "b": D2})
    with pytest.raises(UserInputError, match="base_model"):
        validate_recipe({**F32, "merge_method": "median", "models": [{"model": p["a"]}, {"model": p["b"]}]})
