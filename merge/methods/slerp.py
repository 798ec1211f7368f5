from __future__ import annotations

import math

import torch

from hivemerge.merge.methods.linear import UNUSED_WEIGHT
from hivemerge.merge.methods.registry import MergeMethod, TensorJob, register
from hivemerge.merge.numerics import exact
from hivemerge.merge.params import ParamSpec

DOT_THRESHOLD = 0.9995  # nearly colinear: fall back to linear interpolation (mergekit's rule)
EPS = 1e-8


@register
class Slerp(MergeMethod):
    name = "slerp"
    summary = "Spherical interpolation from the base model (t=0) to the other model (t=1)."
    model_params = (UNUSED_WEIGHT,)
    global_params = (ParamSpec("t", float, low=0.0, high=1.0, doc="interpolation factor"),)
    requires_base = True
    drops_base_from_models = True
    min_models = 1
    max_models = 1

    def merge(self, job: TensorJob) -> torch.Tensor:
        v0, v1, t = job.base, job.models[0], float(job.params["t"])
        # The angle is a transcendental scalar: computed once in float64 on the CPU from
        # device-independent dot products, so every peer uses the same coefficients.
        n0 = math.sqrt(float(exact.dot(v0, v0)))
        n1 = math.sqrt(float(exact.dot(v1, v1)))
        cos = float(exact.dot(v0, v1)) / ((n0 if n0 > EPS else 1.0) * (n1 if n1 > EPS else 1.0))
        if abs(cos) > DOT_THRESHOLD:
            s0, s1 = 1.0 - t, t
        else:
            theta = math.acos(cos)
            sin_theta = math.sin(theta)
            s0 = math.sin(theta - theta * t) / sin_theta
            s1 = math.sin(theta * t) / sin_theta
        return v0 * s0 + v1 * s1
