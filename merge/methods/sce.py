"""SCE (select, calculate, erase): keep the entries where the task vectors vary most,
weigh each model by its task vector's mean square, and average the entries whose sign
agrees with the elected one."""

from __future__ import annotations

import torch

from hivemerge.merge.methods.linear import UNUSED_WEIGHT
from hivemerge.merge.methods.registry import MergeMethod, TensorJob, ordered_sum, register
from hivemerge.merge.methods.task_arithmetic import INT8_MASK
from hivemerge.merge.numerics import exact
from hivemerge.merge.params import ParamSpec

SMALL = 1e-6  # a weight sum below this: the models weigh alike; a divisor below it is this


@register
class Sce(MergeMethod):
    name = "sce"
    summary = "SCE: keep the select_topk entries of largest variance across models, weigh models by mean square, elect signs."
    model_params = (UNUSED_WEIGHT,)
    global_params = (
        ParamSpec("select_topk", float, 1.0, low=0.0, high=1.0, doc="fraction of the varying entries kept (by variance across models)"),
        INT8_MASK,
    )
    requires_base = True
    drops_base_from_models = True

    def merge(self, job: TensorJob) -> torch.Tensor:
        base = job.base
        vectors = [m - base for m in job.models]
        fraction = job.params["select_topk"]
        if fraction < 1:
            keep = self._select(vectors, fraction)
            vectors = [v.mul_(keep) for v in vectors]
        majority = (ordered_sum(vectors) >= 0).to(base.dtype).mul_(2).sub_(1)
        # Each model's weight: the mean square of its (selected) task vector, summed exactly.
        squares = [float(exact.dot(v, v)) / max(v.numel(), 1) for v in vectors]
        whole = sum(squares)
        weights = [1 / len(vectors)] * len(vectors) if abs(whole) < SMALL else [s / whole for s in squares]
        merged = divisor = None
        for v, w in zip(vectors, weights):
            share = (torch.sign(v) == majority).to(base.dtype).mul_(w)  # the weight where the sign agrees, else 0
            term = v.mul(share)
            merged = term if merged is None else merged.add_(term)
            divisor = share if divisor is None else divisor.add_(share)
        return base + merged.div_(divisor.clamp_(min=SMALL))

    @staticmethod
    def _select(vectors: list[torch.Tensor], fraction: float) -> torch.Tensor:
        """1 at the int(fraction x nonzero-variance count) entries of largest variance across
        the models (ties by position), else 0."""
        n = len(vectors)
        mean = exact.divide(ordered_sum(vectors), n)
        variance = None
        for v in vectors:
            square = (v - mean).square_()
            variance = square if variance is None else variance.add_(square)
        variance = exact.divide(variance, n)
        k = int(int(torch.count_nonzero(variance)) * fraction)
        return exact.top_k_mask(variance.abs(), k).to(vectors[0].dtype)
