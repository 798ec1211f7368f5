"""Merge methods. Importing this package registers every built-in method."""

from hivemerge.merge.methods import linear, model_stock, nearswap, robust, sce, slerp, task_arithmetic  # noqa: F401
from hivemerge.merge.methods.registry import METHODS, MergeMethod, TensorJob, register

__all__ = ["METHODS", "MergeMethod", "TensorJob", "register"]
