"""The task-vector family: task arithmetic, TIES, DARE and breadcrumbs.

Every member computes task vectors ``delta_i = model_i - base``, sparsifies each
(none, by magnitude, by random drop, or by magnitude outliers), optionally elects a
sign per coordinate and drops disagreeing entries (TIES consensus), and adds
``lambda * sum_i(w_i * delta_i) [/ sum of contributing weights]`` to the base.
The semantics follow mergekit's generalized task arithmetic so recipes port as written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hivemerge.merge import exact, rng
from hivemerge.merge.methods.linear import WEIGHT
from hivemerge.merge.methods.registry import MergeMethod, TensorJob, register
from hivemerge.merge.params import ParamSpec

DENSITY = ParamSpec("density", float, 1.0, low=0.0, high=1.0, low_open=True, doc="fraction of the task vector kept")
GAMMA = ParamSpec("gamma", float, 0.01, low=0.0, high=1.0, doc="fraction of the largest-magnitude entries dropped")
LAMBDA = ParamSpec("lambda", float, 1.0, doc="scale of the merged task vector")
INT8_MASK = ParamSpec("int8_mask", bool, False, doc="accepted for mergekit compatibility; no effect")


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", bool, default, doc="divide by the sum of the weights that contribute")


RESCALE = ParamSpec("rescale", bool, True, doc="divide kept entries by density (DARE rescaling)")


@dataclass(frozen=True)
class _Family:
    sparsify: str | None  # None, "magnitude", "random", "outliers"
    consensus: bool


class TaskVectorMerge(MergeMethod):
    requires_base = True
    drops_base_from_models = True
    family: _Family

    def merge(self, job: TensorJob) -> torch.Tensor:
        base = job.base
        weights = [p["weight"] for p in job.model_params]
        weighted = []
        for model, params, model_id, w in zip(job.models, job.model_params, job.model_ids, weights):
            delta = self._sparsify(model - base, params, job, model_id)
            weighted.append(delta * w)

        if self.family.consensus:
            sign_total = weighted[0]
            for d in weighted[1:]:
                sign_total = sign_total + d
            majority = torch.where(sign_total >= 0, 1.0, -1.0).to(base.dtype)
            mixed = divisor = None
            for d, w in zip(weighted, weights):
                agrees = torch.sign(d) == majority
                term = torch.where(agrees, d, 0.0)
                share = agrees.to(base.dtype) * w
                mixed = term if mixed is None else mixed + term
                divisor = share if divisor is None else divisor + share
            divisor = torch.where(divisor == 0, 1.0, divisor).to(base.dtype)
        else:
            mixed = weighted[0]
            for d in weighted[1:]:
                mixed = mixed + d
            divisor = sum(weights)
            if abs(divisor) < 1e-8:
                divisor = 1.0

        if job.params["normalize"]:
            mixed = mixed / divisor
        if job.params["lambda"] != 1:
            mixed = mixed * job.params["lambda"]
        return base + mixed

    def _sparsify(self, delta: torch.Tensor, params: dict, job: TensorJob, model_id: int) -> torch.Tensor:
        kind = self.family.sparsify
        density = params.get("density", 1.0)
        if kind is None or density >= 1.0:
            return delta
        n = delta.numel()
        if kind == "magnitude":
            keep = exact.top_k_mask(delta.abs(), int(density * n))
        elif kind == "outliers":
            target = int(density * n)
            skip_top = int(params["gamma"] * n)
            surplus = n - target - skip_top
            if surplus < 0:  # fewer large entries dropped so the target density is met
                skip_top += surplus
            keep = exact.rank_window_mask(delta.abs(), skip_top, target)
        else:  # random drop, DARE
            key = rng.stream_key(job.seed, job.name, model_id)
            keep = rng.bernoulli_mask(key, n, density, delta.device).view(delta.shape)
        kept = torch.where(keep, delta, 0.0)
        if kind == "random" and job.params.get("rescale", False):
            kept = kept / density
        return kept


def _define(name: str, summary: str, family: _Family, normalize: bool, extra_global=(), extra_model=()):
    cls = type(
        name,
        (TaskVectorMerge,),
        {
            "name": name,
            "summary": summary,
            "family": family,
            "global_params": (_normalize(normalize), LAMBDA, INT8_MASK, *extra_global),
            "model_params": (WEIGHT, *extra_model),
        },
    )
    return register(cls)


_define("task_arithmetic", "Base plus the weighted sum of task vectors.", _Family(None, False), False)
_define(
    "ties",
    "TIES: keep each task vector's top-density magnitudes, elect signs, average agreeing entries.",
    _Family("magnitude", True),
    True,
    extra_model=(DENSITY,),
)
_define(
    "dare_linear",
    "DARE: drop task-vector entries at random (keep probability = density), rescale, add.",
    _Family("random", False),
    False,
    extra_global=(RESCALE,),
    extra_model=(DENSITY,),
)
_define(
    "dare_ties",
    "DARE drop and rescale, then TIES sign election.",
    _Family("random", True),
    False,
    extra_global=(RESCALE,),
    extra_model=(DENSITY,),
)
_define(
    "breadcrumbs",
    "Model breadcrumbs: drop the largest (gamma) and smallest entries, keep density.",
    _Family("outliers", False),
    False,
    extra_model=(DENSITY, GAMMA),
)
_define(
    "breadcrumbs_ties",
    "Breadcrumbs sparsification with TIES sign election.",
    _Family("outliers", True),
    False,
    extra_model=(DENSITY, GAMMA),
)
