"""Interpolation on the sphere beyond two-point SLERP: NuSLERP (two models, per vector),
Multi-SLERP (barycentric, any number) and the Karcher mean.

As in slerp.py, the angles are scalars computed in float64 on the CPU from exact dot
products (numerics/exact.py) with Python's math, so every peer gets the same
coefficients; the tensors are only combined elementwise, one operation at a time.
"""

from __future__ import annotations

import math

import torch

from hivemerge.merge.methods.linear import UNUSED_WEIGHT, WEIGHT
from hivemerge.merge.methods.registry import MergeMethod, TensorJob, register, weighted_sum
from hivemerge.merge.numerics import exact
from hivemerge.merge.params import ParamSpec
from hivemerge.protocol.errors import ComputationError, UserInputError


def _norm(x: torch.Tensor) -> float:
    return math.sqrt(float(exact.dot(x, x)))


def _task_vectors(job: TensorJob) -> list[torch.Tensor]:
    """The models, or their task vectors when the recipe names a base."""
    return [m if job.base is None else m - job.base for m in job.models]


def _with_base(job: TensorJob, result: torch.Tensor) -> torch.Tensor:
    return result if job.base is None else result.add_(job.base)


@register
class NuSlerp(MergeMethod):
    name = "nuslerp"
    summary = "NuSLERP: SLERP of two models (or their task vectors) at t = w2 / (w1 + w2), whole or per row or column."
    global_params = (
        ParamSpec("nuslerp_flatten", bool, True, doc="one angle for the whole tensor (false: one per row or column)"),
        ParamSpec("nuslerp_row_wise", bool, False, doc="without flatten: one angle per column vector (false: per row)"),
    )
    model_params = (WEIGHT,)
    uses_base = True
    drops_base_from_models = True
    min_models = 2
    max_models = 2

    def merge(self, job: TensorJob) -> torch.Tensor:
        w0, w1 = (p["weight"] for p in job.model_params)
        t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        v0, v1 = _task_vectors(job)
        shape = v0.shape
        if job.params["nuslerp_flatten"] or v0.dim() < 2:
            v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
        elif job.params["nuslerp_row_wise"]:
            v0, v1 = v0.movedim(0, -1), v1.movedim(0, -1)
        moved = v0.shape
        v0, v1 = v0.reshape(-1, moved[-1]), v1.reshape(-1, moved[-1])
        dots, n0, n1 = (exact.dot(a, b, dim=-1).tolist() for a, b in ((v0, v1), (v0, v0), (v1, v1)))
        first, second = [], []
        for dot, s0, s1 in zip(dots, n0, n1):
            cos = max(-1.0, min(1.0, dot / (max(math.sqrt(s0), 1e-7) * max(math.sqrt(s1), 1e-7))))
            if 1 - cos * cos <= 1e-16:  # (anti)parallel: the straight line
                first.append(1 - t)
                second.append(t)
            else:
                theta = math.acos(cos)
                first.append(math.sin((1 - t) * theta) / math.sin(theta))
                second.append(math.sin(t * theta) / math.sin(theta))
        a = torch.tensor(first, dtype=torch.float64).to(v0.dtype).to(v0.device).unsqueeze(1)
        b = torch.tensor(second, dtype=torch.float64).to(v0.dtype).to(v0.device).unsqueeze(1)
        result = (v0 * a).add_(v1 * b).reshape(moved)
        if not job.params["nuslerp_flatten"] and job.params["nuslerp_row_wise"] and len(shape) >= 2:
            result = result.movedim(-1, 0)
        return _with_base(job, result.reshape(shape).contiguous())


@register
class MultiSlerp(MergeMethod):
    name = "multislerp"
    summary = "Multi-SLERP: barycentric interpolation of any number of models on the sphere, through the tangent space at their weighted mean."
    global_params = (
        ParamSpec("normalize_weights", bool, True, doc="divide the weights by their sum"),
        ParamSpec("eps", float, 1e-8, low=0.0, low_open=True, doc="added to norms, and the smallest mean norm"),
    )
    model_params = (WEIGHT,)
    uses_base = True
    drops_base_from_models = True

    def merge(self, job: TensorJob) -> torch.Tensor:
        vectors = _task_vectors(job)
        if len(vectors) == 1:
            return job.models[0].clone()
        weights = [p["weight"] for p in job.model_params]
        if job.params["normalize_weights"]:
            if abs(math.fsum(weights)) < 1e-12:
                raise UserInputError(f"multislerp: the weights sum to 0 and normalize_weights divides by their sum ({job.name})")
            weights = [w / math.fsum(weights) for w in weights]
        eps = job.params["eps"]
        norms = [_norm(v) for v in vectors]
        units = [exact.divide(v, n + eps) for v, n in zip(vectors, norms)]
        mean = weighted_sum(units, weights)
        mean_norm = _norm(mean)
        if mean_norm < eps:
            if len(vectors) == 2:  # antipodal pair: the straight line
                return _with_base(job, weighted_sum(vectors, weights))
            raise ComputationError(f"multislerp: the weighted mean of the unit inputs of {job.name} is zero "
                                   "(antipodal inputs whose weights balance); change the weights")
        mean = exact.divide(mean, mean_norm)
        tangents = [u - mean * float(exact.dot(u, mean)) for u in units]
        tangent = weighted_sum(tangents, weights)
        size = _norm(tangent) + eps
        result = (mean * math.cos(size)).add_(tangent * (math.sin(size) / size))
        return _with_base(job, result.mul_(math.fsum(n * w for n, w in zip(norms, weights))))


@register
class Karcher(MergeMethod):
    name = "karcher"
    summary = "Karcher mean: the equal-weight Riemannian mean of the models' directions, scaled by their mean norm."
    model_params = (UNUSED_WEIGHT,)
    global_params = (
        ParamSpec("max_iter", int, 10, low=1, high=100, doc="most gradient steps (each a pass over every model: bounded for rounds)"),
        ParamSpec("tol", float, 1e-5, low=0.0, low_open=True, doc="stop when the tangent step is below this"),
    )

    def merge(self, job: TensorJob) -> torch.Tensor:
        tensors = job.models
        if len(tensors) == 1:
            return tensors[0].clone()
        tol, alphas = job.params["tol"], [1.0 / len(tensors)] * len(tensors)
        norms = [_norm(x) for x in tensors]
        valid = [i for i, n in enumerate(norms) if n > tol]
        if not valid:
            return torch.zeros_like(tensors[0])
        units = [exact.divide(tensors[i], norms[i]) for i in valid]
        weights = [alphas[i] / math.fsum(alphas[j] for j in valid) for i in valid]
        mean = weighted_sum(units, weights)
        mean_norm = _norm(mean)
        mean = units[0].clone() if mean_norm < tol else exact.divide(mean, mean_norm)
        for _ in range(job.params["max_iter"]):
            tangent = torch.zeros_like(mean)
            for w, unit in zip(weights, units):
                dot = max(-1.0, min(1.0, float(exact.dot(mean, unit))))
                theta = math.acos(dot)
                if theta < tol:
                    continue
                tangent.add_((unit - mean * dot).mul_(w * theta / math.sin(theta)))
            size = _norm(tangent)
            if size < tol:
                break
            mean = (mean * math.cos(size)).add_(tangent.mul_(math.sin(size) / size))
            size = _norm(mean)
            if size > tol:
                mean = exact.divide(mean, size)
        return mean.mul_(math.fsum(a * n for a, n in zip(alphas, norms)))

