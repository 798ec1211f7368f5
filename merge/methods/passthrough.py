"""Passthrough: one model's tensors as they are (cast to the output dtype), and with
mergekit's ``slices:`` the layer ranges of several models stacked (a frankenmerge; the
stacking is planned in merge/slices.py, the engine copies each output tensor from its source)."""

from __future__ import annotations

import torch

from hivemerge.merge.methods.linear import UNUSED_WEIGHT
from hivemerge.merge.methods.registry import MergeMethod, TensorJob, register


@register
class Passthrough(MergeMethod):
    name = "passthrough"
    summary = "Passthrough: one model unchanged (a dtype conversion), or with slices: layer ranges of models stacked."
    model_params = (UNUSED_WEIGHT,)
    min_models = 1
    max_models = 1

    def merge(self, job: TensorJob) -> torch.Tensor:
        return job.models[0]
