from __future__ import annotations

import torch

from hivemerge.merge.methods.registry import MergeMethod, TensorJob, register, weighted_sum
from hivemerge.merge.numerics import exact
from hivemerge.merge.params import ParamSpec

WEIGHT = ParamSpec("weight", float, doc="the model's weight")
# mergekit reads only the parameters a method declares, so its recipes often give every
# model a weight: the methods that weigh no model accept it, with a warning.
UNUSED_WEIGHT = ParamSpec("weight", float, 1.0, ignored=True, doc="accepted as mergekit accepts it; no effect")
NORMALIZE_TRUE = ParamSpec("normalize", bool, True, doc="divide by the sum of the weights")


@register
class Linear(MergeMethod):
    name = "linear"
    summary = "Weighted average of the models' weights (model soup)."
    global_params = (NORMALIZE_TRUE,)
    model_params = (WEIGHT,)

    def merge(self, job: TensorJob) -> torch.Tensor:
        weights = [p["weight"] for p in job.model_params]
        total = weighted_sum(job.models, weights)
        divisor = sum(weights)
        if job.params["normalize"] and abs(divisor) > 1e-8:
            total = exact.divide(total, divisor)
        return total
