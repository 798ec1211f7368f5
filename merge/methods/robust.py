"""Robust aggregation of task vectors: a few bad or extreme experts cannot drag the merge.

Each method computes ``base + lambda * aggregate(model_i - base)`` where the aggregate
is order-free (sorting is exact) or uses only exact reductions, so results stay
identical on every peer:

- ``median``: coordinate-wise median (mean of the two middle values for an even count)
- ``trimmed_mean``: coordinate-wise mean after dropping the ``trim`` fraction of the
  largest and of the smallest values
- ``centered_clip``: start from the median, then repeatedly move towards the mean of
  the task vectors each clipped to norm ``tau`` around the current centre
"""

from __future__ import annotations

import math

import torch

from hivemerge.merge.methods.registry import MergeMethod, TensorJob, register
from hivemerge.merge.methods.task_arithmetic import LAMBDA
from hivemerge.merge.numerics import exact
from hivemerge.merge.params import ParamSpec


class RobustMerge(MergeMethod):
    requires_base = True
    drops_base_from_models = True

    def merge(self, job: TensorJob) -> torch.Tensor:
        deltas = [m - job.base for m in job.models]
        aggregate = self.aggregate(deltas, job.params)
        if job.params["lambda"] != 1:
            aggregate = aggregate * job.params["lambda"]
        return job.base + aggregate

    def aggregate(self, deltas: list[torch.Tensor], params: dict) -> torch.Tensor:
        raise NotImplementedError


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return exact.divide(total, len(tensors))


def _median(deltas: list[torch.Tensor]) -> torch.Tensor:
    ordered = torch.sort(torch.stack(deltas), dim=0).values  # exact: a permutation
    n = len(deltas)
    if n % 2:
        return ordered[n // 2]
    return exact.divide(ordered[n // 2 - 1] + ordered[n // 2], 2)


@register
class Median(RobustMerge):
    name = "median"
    summary = "Base plus the coordinate-wise median of the task vectors (robust to a minority of outliers)."
    global_params = (LAMBDA,)

    def aggregate(self, deltas, params):
        return _median(deltas)


@register
class TrimmedMean(RobustMerge):
    name = "trimmed_mean"
    summary = "Base plus the coordinate-wise mean of the task vectors after trimming the extremes."
    global_params = (
        LAMBDA,
        ParamSpec(
            "trim", float, 0.2, low=0.0, high=0.5, doc="fraction dropped at each end (rounded down per coordinate count)"
        ),
    )

    def aggregate(self, deltas, params):
        n = len(deltas)
        k = min(int(params["trim"] * n), (n - 1) // 2)
        ordered = torch.sort(torch.stack(deltas), dim=0).values
        return _mean(list(ordered[k : n - k]))


@register
class CenteredClip(RobustMerge):
    name = "centered_clip"
    summary = "Base plus the centered-clipping aggregate of the task vectors (Karimireddy et al.)."
    global_params = (
        LAMBDA,
        ParamSpec(
            "tau", float, 1.0, low=0.0, low_open=True, doc="clipping radius (L2, per tensor)"
        ),
        ParamSpec(
            "iterations", int, 3, low=1, high=100, doc="clipping rounds"
        ),
    )

    def aggregate(self, deltas, params):
        center = _median(deltas)
        for _ in range(params["iterations"]):
            steps = []
            for d in deltas:
                diff = d - center
                norm = math.sqrt(float(exact.dot(diff, diff)))  # exact: the same scale on every peer
                scale = min(1.0, params["tau"] / norm) if norm > 0 else 1.0
                steps.append(diff * scale)
            center = center + _mean(steps)
        return center
