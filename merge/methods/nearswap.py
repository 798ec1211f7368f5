"""NearSwap: take the other model's value where it is near the base's, keep the base's where they are far apart."""

from __future__ import annotations

import torch

from hivemerge.merge.methods.linear import UNUSED_WEIGHT
from hivemerge.merge.methods.registry import MergeMethod, TensorJob, register
from hivemerge.merge.params import ParamSpec

CLOSE = 1e-6  # distances below this count as this (no division by zero)


@register
class NearSwap(MergeMethod):
    name = "nearswap"
    summary = "NearSwap: per entry, weight min(1, t / |model - base|) on the model, the rest on the base."
    model_params = (UNUSED_WEIGHT,)
    global_params = (ParamSpec("t", float, low=0.0, low_open=True, doc="the sameness threshold: distances up to t swap fully"),)
    requires_base = True
    drops_base_from_models = True
    min_models = 1
    max_models = 1

    def merge(self, job: TensorJob) -> torch.Tensor:
        base, model = job.base, job.models[0]
        distance = (base - model).abs_().clamp_(min=CLOSE)
        # a tensor divided by a tensor: one rounding on every device (exact.divide's note)
        weight = torch.full_like(distance, job.params["t"]).div_(distance).clamp_(0.0, 1.0)
        return (weight * model).add_((1 - weight).mul_(base))
