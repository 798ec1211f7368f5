"""Arcee Fusion: take the model's value only where it moved far from the base's and the
row's output distribution moved with it (importance above a threshold set by its quartiles)."""

from __future__ import annotations

import math

import torch

from hivemerge.merge.methods.linear import UNUSED_WEIGHT
from hivemerge.merge.methods.registry import MergeMethod, TensorJob, register
from hivemerge.merge.numerics import exact

SMOOTHING = 1e-8  # added to each softmax probability, as mergekit does
_BLOCK = 1 << 18  # float64 entries of a block of rows


@register
class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    summary = "Arcee Fusion: the model's entries whose |change| x the row's KL(softmax(model) || softmax(base)) exceed median + 1.5 IQR."
    model_params = (UNUSED_WEIGHT,)
    requires_base = True
    drops_base_from_models = True
    min_models = 1
    max_models = 1

    def merge(self, job: TensorJob) -> torch.Tensor:
        base, model = job.base, job.models[0]
        importance = (model - base).abs_().mul_(_row_divergence(model, base).to(base.device))
        values = importance.reshape(-1).to(torch.float32)
        # mergekit's quantiles: the sorted values at floor(q (n - 1)); exact here (mergekit samples 1M entries of larger tensors)
        q1, median, q3 = (_kth_smallest(values, math.floor(q * (values.numel() - 1))) for q in (0.25, 0.5, 0.75))
        threshold = median + 1.5 * (q3 - q1)
        keep = (values >= threshold).view(base.shape).to(base.dtype)
        return base + (model - base).mul_(keep)


def _row_divergence(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(model) || softmax(base)) of each row (the last dimension), in float64 on
    the CPU with every sum by a fixed tree (exact.pairwise_sum), rounded to float32: a
    column of the rows' shape (1-D tensors: one row). exp and log are elementwise (within
    an ulp of float64 on any libm), far below the float32 rounding of the result."""
    width = model.shape[-1] if model.dim() else 1
    rows_m, rows_b = model.reshape(-1, width), base.reshape(-1, width)
    step = max(1, _BLOCK // max(width, 1))  # a block of rows at a time: float64 temporaries stay small
    out = torch.empty(rows_m.shape[0], dtype=torch.float32)
    for r in range(0, rows_m.shape[0], step):
        p = _softmax(rows_m[r : r + step].to("cpu", torch.float64)).add_(SMOOTHING)
        q = _softmax(rows_b[r : r + step].to("cpu", torch.float64)).add_(SMOOTHING)
        out[r : r + step] = exact.pairwise_sum(p * torch.log(p / q), dim=-1).to(torch.float32)
    return out.view(*model.shape[:-1], 1) if model.dim() else out.view(())


def _softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.amax(dim=-1, keepdim=True))  # amax is exact, in any order
    return e.div_(exact.pairwise_sum(e, dim=-1).unsqueeze(-1))


def _kth_smallest(values: torch.Tensor, index: int) -> float:
    """The value at ``index`` of the ascending sort (non-negative float32), by the exact
    radix select (numerics/exact.py), without sorting."""
    return float(exact.kth_largest(values, values.numel() - index))
