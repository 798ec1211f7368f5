"""The registry of merge methods.

A method is a block that declares its parameters (:class:`ParamSpec`) and how many
inputs it takes, and implements :meth:`MergeMethod.merge` for one tensor. Recipe
validation, the ``hivemerge methods`` listing and ``--help`` read the declarations, so
a new method needs nothing but its class and a ``@register``.

Implementations must keep the output a pure function of the inputs on any device and
thread count: elementwise torch operations, one kernel per operation (no fused
multiply-add across a weighted sum), models combined in recipe order, and reductions
only through :mod:`hivemerge.merge.numerics.exact`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from hivemerge.merge.params import ParamSpec


@dataclass
class TensorJob:
    """Everything a method sees for one tensor."""

    name: str
    base: torch.Tensor | None  # on the merge device; in ``dtype`` unless the method converts_inputs
    models: list[torch.Tensor]
    model_params: list[dict[str, Any]]  # resolved for this tensor, one dict per model
    params: dict[str, Any]  # resolved global parameters
    dtype: torch.dtype  # the recipe's compute dtype
    out_dtype: torch.dtype  # what the engine writes; a method may already return it
    model_ids: list[int] = field(default_factory=list)  # stable indices, key the random streams
    seed: int = 0
    into: torch.Tensor | None = None  # a uint8 buffer the result may be written into (the engine reuses it)

    def output(self, numel: int) -> torch.Tensor:
        """``numel`` entries of ``out_dtype`` for the result, flat: in ``into`` when it is
        on the base's device and large enough, else new memory."""
        device = self.base.device if self.base is not None else torch.device("cpu")
        size = numel * self.out_dtype.itemsize
        if self.into is not None and self.into.device == device and self.into.numel() >= size:
            return self.into[:size].view(self.out_dtype)
        return torch.empty(numel, dtype=self.out_dtype, device=device)


class MergeMethod:
    name: ClassVar[str]
    summary: ClassVar[str]
    global_params: ClassVar[tuple[ParamSpec, ...]] = ()
    model_params: ClassVar[tuple[ParamSpec, ...]] = ()
    requires_base: ClassVar[bool] = False
    # Takes the base when the recipe names one (interpolating task vectors, not weights).
    uses_base: ClassVar[bool] = False
    # Task-vector methods merge (model - base): a model equal to the base adds nothing
    # and is dropped from their inputs, as mergekit does.
    drops_base_from_models: ClassVar[bool] = False
    # False: the engine hands over inputs converted to the compute dtype. True: in the
    # dtype they are stored in (half the memory for fp16 files); the method converts
    # to ``job.dtype`` itself, piece by piece.
    converts_inputs: ClassVar[bool] = False
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None

    def merge(self, job: TensorJob) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def param_spec(cls, name: str) -> ParamSpec | None:
        for spec in cls.global_params + cls.model_params:
            if spec.name == name:
                return spec
        return None

    @classmethod
    def describe(cls) -> dict:
        def spec_dict(s: ParamSpec) -> dict:
            return {
                "name": s.name,
                "type": s.kind.__name__,
                "default": None if s.required else s.default,
                "required": s.required,
                "range": s.describe_range(),
                "doc": s.doc,
            }

        return {
            "name": cls.name,
            "summary": cls.summary,
            "requires_base": cls.requires_base,
            "models": f"{cls.min_models}..{cls.max_models if cls.max_models is not None else 'n'}",
            "global_parameters": [spec_dict(s) for s in cls.global_params],
            "model_parameters": [spec_dict(s) for s in cls.model_params],
        }


METHODS: dict[str, MergeMethod] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    METHODS[cls.name] = cls()
    return cls


def ordered_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """t0 + t1 + ..., in list order, into a new tensor: the same sum on every device."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total.add_(t)
    return total


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i * x_i, one rounding per product and per addition, in list order."""
    total = tensors[0] * weights[0]
    for x, w in zip(tensors[1:], weights[1:]):
        total = total + x * w
    return total
