"""RAM (Reinforced Agent Merging) and its tensor-local variant RAM+: an entry that one
task vector changes keeps that change whole; one that several change gets their mean."""

from __future__ import annotations

import torch

from hivemerge.merge.methods.linear import UNUSED_WEIGHT
from hivemerge.merge.methods.registry import MergeMethod, TensorJob, register
from hivemerge.merge.params import ParamSpec

EPSILON = ParamSpec("epsilon", float, 1e-5, low=0.0, doc="a task-vector entry counts as a change when its magnitude exceeds this")


class _Ram(MergeMethod):
    model_params = (UNUSED_WEIGHT,)
    requires_base = True
    drops_base_from_models = True

    def merge(self, job: TensorJob) -> torch.Tensor:
        base = job.base
        vectors = [m - base for m in job.models]
        changed = [v.abs() > job.params["epsilon"] for v in vectors]
        count = torch.zeros_like(base, dtype=torch.int32)
        for c in changed:
            count.add_(c.to(torch.int32))
        unique, shared = count == 1, count > 1
        scale = self._unique_scales(changed, unique, shared, job.params)
        divisor = count.clamp(min=1).to(base.dtype)
        merged = torch.zeros_like(base)
        for v, c, s in zip(vectors, changed, scale):
            # unique entries: the change (x its model's scale); shared: the change over how many made one
            unique_part = v.mul(c & unique)
            if s != 1.0:
                unique_part.mul_(s)
            merged.add_(unique_part).add_(v.mul(c & shared).div_(divisor))
        return merged.add_(base)

    def _unique_scales(self, changed, unique, shared, params) -> list[float]:
        return [1.0] * len(changed)


@register
class Ram(_Ram):
    name = "ram"
    summary = "RAM: entries one task vector changes keep that change, entries several change take their mean."
    global_params = (EPSILON,)


@register
class RamPlus(_Ram):
    name = "ramplus_tl"
    summary = "RAM+ (tensor-local): RAM, each model's unique changes scaled up by 1 + r min(alpha, shared / unique)."
    global_params = (
        ParamSpec("r", float, 0.1, low=0.0, doc="how much a model's share of overlapping changes scales up its unique ones"),
        ParamSpec("alpha", float, 0.2, low=0.0, doc="cap on the ratio of shared to unique changes"),
        EPSILON,
    )

    def _unique_scales(self, changed, unique, shared, params) -> list[float]:
        scales = []
        for c in changed:
            # counted exactly as integers; the ratio and scale in float64, as one float32 factor
            rho = int((c & shared).sum()) / max(int((c & unique).sum()), params["epsilon"])
            scale = 1 + params["r"] * min(max(rho, 0.0), params["alpha"])
            scales.append(float(torch.tensor(scale, dtype=torch.float32)))
        return scales
