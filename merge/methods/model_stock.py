from __future__ import annotations

import torch

from hivemerge.merge.methods.linear import UNUSED_WEIGHT
from hivemerge.merge.methods.registry import MergeMethod, TensorJob, register
from hivemerge.merge.numerics import exact
from hivemerge.merge.params import ParamSpec

EPS = 1e-8
SINGULAR = 1e-6  # |1 + (N-1) cos| below this: the ratio is meaningless


@register
class ModelStock(MergeMethod):
    name = "model_stock"
    summary = "Model Stock: interpolate between the base and the models' average by their task vectors' angle."
    model_params = (UNUSED_WEIGHT,)
    global_params = (ParamSpec("filter_wise", bool, False, doc="one ratio per row instead of per tensor"),)
    requires_base = True
    drops_base_from_models = True
    min_models = 2

    def merge(self, job: TensorJob) -> torch.Tensor:
        base, models = job.base, job.models
        row_wise = job.params["filter_wise"] and base.dim() > 1
        shape = base.shape if row_wise else (-1,)
        offsets = [(m - base).reshape(shape) for m in models]
        norms = [exact.dot(o, o, dim=-1).sqrt() for o in offsets]
        cos_sum, pairs = None, 0
        for i in range(len(offsets)):
            for j in range(i + 1, len(offsets)):
                cos = exact.dot(offsets[i], offsets[j], dim=-1) / (norms[i] * norms[j]).clamp(min=EPS)
                cos = cos.clamp(-1.0, 1.0)
                cos_sum = cos if cos_sum is None else cos_sum + cos
                pairs += 1
        cos = exact.divide(cos_sum, pairs)
        n = len(models)
        denominator = 1 + (n - 1) * cos
        # Where it (nearly) vanishes, e.g. experts e and 2*base - e, the ratio is +-inf or
        # millions: that tensor keeps the base (ratio 0) rather than write NaN or garbage.
        singular = denominator.abs() < SINGULAR
        ratio = torch.where(singular, 0.0, (n * cos) / torch.where(singular, 1.0, denominator))  # float64
        ratio = ratio.to(base.dtype)
        if row_wise:
            ratio = ratio.unsqueeze(-1)
        average = models[0]
        for m in models[1:]:
            average = average + m
        average = exact.divide(average, n)
        return average * ratio + base * (1 - ratio)
