"""Merge methods. Importing this package registers every built-in method."""

from hivemerge.merge.methods import (  # noqa: F401
    arcee_fusion,
    linear,
    model_stock,
    nearswap,
    passthrough,
    ram,
    robust,
    sce,
    slerp,
    spherical,
    task_arithmetic,
)
from hivemerge.merge.methods.registry import METHODS, MergeMethod, TensorJob, register

__all__ = ["METHODS", "MergeMethod", "TensorJob", "register"]
