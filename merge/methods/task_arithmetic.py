"""The task-vector family: task arithmetic, TIES, DARE, breadcrumbs and DELLA.

Every member computes task vectors ``delta_i = model_i - base``, sparsifies each
(none, by magnitude, by random drop, by magnitude outliers, or by DELLA's
rank-dependent random drop), optionally rescales what is kept to the task vector's L1
norm, optionally elects a sign per coordinate and drops disagreeing entries (TIES
consensus), and adds ``lambda * sum_i(w_i * delta_i) [/ sum of contributing weights]``
to the base. The semantics and parameters follow mergekit 0.1.5's generalized task
arithmetic so recipes port as written; where they differ (ties at a magnitude
threshold are broken by position; random drops come from the keyed stream), see
docs/merging.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hivemerge.merge.methods.linear import WEIGHT
from hivemerge.merge.methods.registry import MergeMethod, TensorJob, ordered_sum, register
from hivemerge.merge.methods.sparsify import (
    KeepDella,
    KeepRandom,
    KeepRanked,
    KeepRule,
    della_bounds,
    each_span,
    keep_by_rank,
    l1_rescale,
    unchanged,
)
from hivemerge.merge.numerics import exact, kernels, rng
from hivemerge.merge.params import ParamSpec

DENSITY = ParamSpec("density", float, 1.0, low=0.0, high=1.0, low_open=True, doc="fraction of the task vector kept")
GAMMA = ParamSpec("gamma", float, 0.01, low=0.0, high=1.0, doc="fraction of the largest-magnitude entries dropped")
LAMBDA = ParamSpec("lambda", float, 1.0, doc="scale of the merged task vector")
INT8_MASK = ParamSpec("int8_mask", bool, False, doc="accepted for mergekit compatibility; no effect")
EPSILON = ParamSpec("epsilon", float, 0.15, low=0.0, high=1.0, low_open=True,
                    doc="DELLA: keep probabilities run from density - epsilon (smallest) to density + epsilon (largest)")
UNUSED_DENSITY = ParamSpec("density", float, 1.0, low=0.0, high=1.0, low_open=True, ignored=True,
                           doc="accepted as mergekit accepts it; no effect (nothing is sparsified)")


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", bool, default, doc="divide by the sum of the weights that contribute")


def _rescale(default: bool, ignored: bool = False) -> ParamSpec:
    return ParamSpec("rescale", bool, default, ignored=ignored,
                     doc="accepted as mergekit accepts it; no effect (nothing is sparsified)" if ignored else
                     "scale each sparsified task vector back to its L1 norm: x sum|delta| / sum|kept| (mergekit's rescale)")


@dataclass(frozen=True)
class _Family:
    sparsify: str | None  # None, "magnitude", "random", "outliers", "della"
    consensus: bool


class TaskVectorMerge(MergeMethod):
    requires_base = True
    drops_base_from_models = True
    converts_inputs = True
    family: _Family

    def merge(self, job: TensorJob) -> torch.Tensor:
        """Chunk by chunk in flat order, each chunk converted to ``job.dtype`` on its
        own: whole-tensor float temporaries would cost more time in page faults and
        memory traffic than the arithmetic (the sparsifiers decide over the whole tensor first)."""
        base = job.base.reshape(-1)
        models = [m.reshape(-1) for m in job.models]
        weights = [p["weight"] for p in job.model_params]
        # A task vector that is +0 everywhere (an expert that left the tensor as it was) needs
        # no selection: whatever is kept of it is +0. Each selection's passes are split among
        # the merge's workers (numerics/exact.py).
        if self.family.sparsify == "della":  # checked whether or not a draw is needed
            for p in job.model_params:
                della_bounds(p.get("density", 1.0), p["epsilon"])
        same = [unchanged(base, m, job.dtype) for m in models]
        rules = [(None, 1.0) if s else self._keep_rule(base, m, p, job, i)
                 for s, m, p, i in zip(same, models, job.model_params, job.model_ids)]
        out = job.output(base.numel())
        if all(same):  # every entry's merged task vector is that of +0 entries: computed once, as the chunks would
            zero = self._mix([torch.zeros(1, dtype=job.dtype, device=base.device).mul_(w) for w in weights], weights, job.params)
            each_span(base.numel(), base.device,
                      lambda start, stop: out[start:stop].copy_(base[start:stop].to(job.dtype, copy=True).add_(zero)))
            return out.view(job.base.shape)

        def merge_chunk_fused(start: int, stop: int) -> None:  # merge_chunk's operations, in one loop per expert and one to mix
            rows = kernels.scratch("task vectors", len(models) * (stop - start)).view(len(models), stop - start)
            for row, model, (rule, factor), w in zip(rows, raw_models, rules, weights):
                kernels.task_vector(raw_base[start:stop], model[start:stop], start, *_cuts_or_mask(rule, start, stop), factor, w,
                                    row)
            kernels.mix(rows, weights, self.family.consensus, job.params["normalize"], _plain_divisor(weights),
                        job.params["lambda"], raw_base[start:stop], raw_out[start:stop])

        def merge_chunk(start: int, stop: int) -> None:
            b = base[start:stop].to(job.dtype)
            weighted = []
            for model, (rule, factor), w in zip(models, rules, weights):
                delta = model[start:stop].to(job.dtype, copy=True).sub_(b)  # our own: in-place work is safe
                if rule is not None:
                    exact.keep_or_zero(delta, rule.keep_bits(delta, start))
                    if factor != 1.0:
                        delta.mul_(factor)
                weighted.append(delta if w == 1.0 else delta.mul_(w))  # x * 1.0 is x (a NaN stays a NaN)
            out[start:stop] = self._mix(weighted, weights, job.params).add_(b)

        fused = job.dtype == torch.float32 and kernels.usable(base, *models, out)
        if fused:  # numpy views, made once: the spans slice them
            raw_base, raw_models, raw_out = kernels.raw(base), [kernels.raw(m) for m in models], kernels.raw(out)
        each_span(base.numel(), base.device, merge_chunk_fused if fused else merge_chunk)
        return out.view(job.base.shape)

    def _mix(self, weighted: list[torch.Tensor], weights: list[float], params: dict) -> torch.Tensor:
        """The merged task vector of a chunk (a new tensor; ``weighted`` is used up)."""
        if self.family.consensus:
            mixed, divisor = _elect_signs(weighted, weights)
        else:
            mixed, divisor = ordered_sum(weighted), _plain_divisor(weights)
        if params["normalize"]:
            if isinstance(divisor, torch.Tensor):  # per entry (the elected signs' weights)
                mixed.div_(divisor)
            else:
                exact.divide(mixed, divisor, out=mixed)
        if params["lambda"] != 1:
            mixed.mul_(params["lambda"])
        return mixed

    def _keep_rule(self, base: torch.Tensor, model: torch.Tensor, params: dict, job: TensorJob,
                   model_id: int) -> tuple[KeepRule | None, float]:
        """What the family's sparsifier keeps of ``model - base`` (None: everything), and
        the factor the kept entries are multiplied by (``rescale``)."""
        rule = self._sparsifier(base, model, params, job, model_id)
        if rule is None or not job.params.get("rescale", False):
            return rule, 1.0
        return rule, l1_rescale(base, model, job.dtype, rule)

    def _sparsifier(self, base: torch.Tensor, model: torch.Tensor, params: dict, job: TensorJob, model_id: int) -> KeepRule | None:
        kind = self.family.sparsify
        density = params.get("density", 1.0)
        if kind is None or density >= 1.0:
            return None
        if kind == "random":  # DARE
            return KeepRandom(rng.stream_key(job.seed, job.name, model_id), density)
        if kind == "della":
            return KeepDella(base, model, job.dtype, tuple(job.base.shape), density, params["epsilon"],
                             rng.stream_key(job.seed, job.name, model_id))
        n = base.numel()
        # mergekit's magnitude selection keeps at least one entry of a non-empty tensor
        target = max(1, int(density * n)) if kind == "magnitude" and n else int(density * n)
        skip_top = 0
        if kind == "outliers":
            skip_top = int(params["gamma"] * n)
            surplus = n - target - skip_top
            if surplus < 0:  # fewer large entries dropped so the target density is met
                skip_top += surplus
        return keep_by_rank(base, model, job.dtype, skip_top, skip_top + target)


def _plain_divisor(weights: list[float]) -> float:
    """What a merge without sign election divides by when it normalizes: the sum of the weights (1 where it is about 0)."""
    total = sum(weights)
    return 1.0 if abs(total) < 1e-8 else total


def _cuts_or_mask(rule: KeepRule | None, start: int, stop: int) -> tuple[exact.TopK | None, exact.TopK | None, torch.Tensor | None]:
    """A keep rule as the fused loop takes it: rank cuts (top, skipped), or the span's mask
    (a random draw's, DELLA's); nothing for "keep every entry"."""
    if rule is None:
        return None, None, None
    if isinstance(rule, KeepRanked):
        return rule.top, rule.skipped, None
    return None, None, rule.keep_bits(torch.empty(stop - start, dtype=torch.float32), start)  # a mask's width is its delta's


def _elect_signs(weighted: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES consensus: the sum of the entries whose sign is that of their total (>= 0
    counts as +), and the sum of their weights (1 where that is 0).

    Written without torch.where and boolean temporaries, which are several times slower
    on the CPU, but bit for bit what ``agrees = sign(d) == majority``, ``where(agrees,
    d, 0.0)`` and ``agrees * w`` give: sign(d) * majority is 1 exactly where they agree
    and 0 or -1 elsewhere (sign of NaN is 0). Zeros may come out as -0.0 in the weight
    sums, which changes no sum that is not 0, and 0 becomes 1."""
    dtype = weighted[0].dtype
    positive = ordered_sum(weighted) >= 0
    majority = positive.view(torch.uint8).to(dtype).mul_(2).sub_(1)  # +1 or -1
    mixed = divisor = None
    for d, w in zip(weighted, weights):
        agrees = torch.sign(d).mul_(majority).clamp_min_(0)  # 1 where agreeing, else 0 (maybe -0.0)
        term = exact.keep_or_zero(d, agrees.to(exact.int_like(d)).neg_())
        share = agrees if w == 1.0 else agrees.mul_(w)
        mixed = term if mixed is None else mixed.add_(term)
        divisor = share if divisor is None else divisor.add_(share)
    return mixed, divisor.add_((divisor == 0).view(torch.uint8).to(dtype))  # 0 -> 1; others + 0.0, unchanged


def _define(name: str, summary: str, family: _Family, normalize: bool, rescale: bool, extra_model=()):
    """One member: mergekit's defaults for ``normalize`` and ``rescale``; every member
    takes ``density`` (and ``rescale``), as in mergekit, even where nothing is sparsified."""
    sparsified = family.sparsify is not None
    cls = type(
        name,
        (TaskVectorMerge,),
        {
            "name": name,
            "summary": summary,
            "family": family,
            "global_params": (_normalize(normalize), LAMBDA, INT8_MASK, _rescale(rescale, ignored=not sparsified)),
            "model_params": (WEIGHT, DENSITY if sparsified else UNUSED_DENSITY, *extra_model),
        },
    )
    return register(cls)


_define("task_arithmetic", "Base plus the weighted sum of task vectors.", _Family(None, False), False, False)
_define("ties", "TIES: keep each task vector's top-density magnitudes, elect signs, average agreeing entries.",
        _Family("magnitude", True), True, False)
_define("dare_linear", "DARE: drop task-vector entries at random (keep probability = density), rescale, add.",
        _Family("random", False), False, True)
_define("dare_ties", "DARE drop and rescale, then TIES sign election.", _Family("random", True), False, True)
_define("breadcrumbs", "Model breadcrumbs: drop the largest (gamma) and smallest entries, keep density.",
        _Family("outliers", False), False, False, extra_model=(GAMMA,))
_define("breadcrumbs_ties", "Breadcrumbs sparsification with TIES sign election.", _Family("outliers", True), False, False,
        extra_model=(GAMMA,))
_define("della", "DELLA: drop entries at random, larger magnitudes kept more often (density +- epsilon by rank), "
        "rescale, elect signs.", _Family("della", True), True, True, extra_model=(EPSILON,))
_define("della_linear", "DELLA's magnitude-ranked random drop and rescale, then a weighted sum (no sign election).",
        _Family("della", False), False, True, extra_model=(EPSILON,))
