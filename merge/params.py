"""Declared merge parameters and the forms their values take in a recipe.

A method declares each parameter once (:class:`ParamSpec`); validation, defaults, the
``methods`` listing and ``--help`` all come from that declaration.

A parameter's value in a recipe is one of (mergekit's dialect, plus one extension):

- a scalar: ``0.5``
- a gradient: ``[0.1, 0.5, 0.9]``, interpolated linearly over the layers
- a filtered list: ``[{filter: mlp, value: 0.8}, {value: 0.3}]``; the first entry whose
  ``filter`` is a substring of the tensor name wins, an entry without filter matches all
- a per-layer table (extension): ``{per_layer: [v0, ..., v(L-1)], default: v}``; layer
  ``i``'s tensors take ``v_i`` and tensors outside the layers take ``default``. This is
  the paper's fine-grained layer-wise merge: each layer its own weight and density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hivemerge.merge.layers import layer_index, layer_position

REQUIRED = object()


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: type  # float, int, bool or str
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # (low, ...] instead of [low, ...]
    doc: str = ""
    choices: tuple[str, ...] = ()  # for kind str
    # Accepted because mergekit accepts it, but it changes nothing here (e.g. density on
    # task_arithmetic): a recipe that sets it is merged, with one warning naming it.
    ignored: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe_range(self) -> str:
        if self.kind is bool:
            return "true|false"
        if self.kind is str:
            return "|".join(self.choices)
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high is None else ']'}"

    def check_scalar(self, value: Any, path: str, errors: list[str]) -> None:
        if self.kind is str:
            if value not in self.choices:
                errors.append(f"{path}: must be one of {list(self.choices)}, got {value!r}")
            return
        if self.kind is bool:
            if not isinstance(value, bool):
                errors.append(f"{path}: must be true or false, got {value!r}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: must be a number, got {value!r}")
            return
        if self.kind is int and (not isinstance(value, int) or abs(value) > 1 << 53):
            errors.append(f"{path}: must be an integer (at most 2**53), got {str(value)[:40]}")
            return
        if not math.isfinite(value):
            errors.append(f"{path}: must be finite, got {value!r}")
            return
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            errors.append(f"{path}: must be in {self.describe_range()}, got {value!r}")


def validate_value(spec: ParamSpec, value: Any, path: str, num_layers: int, errors: list[str]) -> None:
    """Check one recipe value of ``spec`` in any of its forms; append errors naming ``path``.

    ``num_layers`` < 0 means the layer count is unknown (an input failed to open), so
    per-layer tables are checked for their values but not their length.
    """
    if isinstance(value, dict):
        unknown = set(value) - {"per_layer", "default"}
        if unknown or "per_layer" not in value:
            errors.append(
                f"{path}: a mapping must be a per-layer table {{per_layer: [...], default: value}}"
                + (f"; unknown keys {sorted(unknown)}" if unknown else "")
            )
            return
        table = value["per_layer"]
        if not isinstance(table, list) or (num_layers >= 0 and len(table) != num_layers):
            got = f"{len(table)} values" if isinstance(table, list) else repr(table)
            want = f"{num_layers} values (one per layer)" if num_layers >= 0 else "a list of values"
            errors.append(f"{path}.per_layer: expected {want}, got {got}")
            return
        for i, v in enumerate(table):
            spec.check_scalar(v, f"{path}.per_layer[{i}]", errors)
        if "default" in value:
            validate_value(spec, value["default"], f"{path}.default", num_layers, errors)
        elif spec.required:
            errors.append(f"{path}.default: required (the value for tensors outside the layers)")
        return
    if isinstance(value, list):
        if not value:
            errors.append(f"{path}: an empty list is not a value")
        elif all(isinstance(e, dict) for e in value):
            for i, entry in enumerate(value):
                unknown = set(entry) - {"filter", "value"}
                if unknown:
                    errors.append(f"{path}[{i}]: unknown keys {sorted(unknown)}; expected filter and value")
                if "value" not in entry:
                    errors.append(f"{path}[{i}].value: required")
                    continue
                if "filter" in entry and not isinstance(entry["filter"], str):
                    errors.append(f"{path}[{i}].filter: must be a string, got {entry['filter']!r}")
                if isinstance(entry["value"], dict):
                    errors.append(f"{path}[{i}].value: must be a scalar or a gradient")
                else:
                    validate_value(spec, entry["value"], f"{path}[{i}].value", num_layers, errors)
        elif any(isinstance(e, (dict, list)) for e in value):
            errors.append(f"{path}: a list is either a gradient of numbers or a list of {{filter, value}}")
        else:
            for i, v in enumerate(value):
                spec.check_scalar(v, f"{path}[{i}]", errors)
        return
    spec.check_scalar(value, path, errors)


def resolve_value(value: Any, tensor_name: str, num_layers: int) -> Any:
    """The value of an already validated recipe parameter for one tensor (None: no filter matched)."""
    if isinstance(value, dict):
        index = layer_index(tensor_name)
        if index is not None and index < len(value["per_layer"]):
            return value["per_layer"][index]
        return resolve_value(value.get("default"), tensor_name, num_layers)
    if isinstance(value, list):
        if all(isinstance(e, dict) for e in value):
            for entry in value:
                if "filter" not in entry or entry["filter"] in tensor_name:
                    return resolve_value(entry["value"], tensor_name, num_layers)
            return None
        return _interpolate(value, layer_position(tensor_name, num_layers))
    return value


def _interpolate(points: list, t: float) -> Any:
    if isinstance(points[0], bool):
        return points[int(t * (len(points) - 1))]
    scaled = t * (len(points) - 1)
    i0 = math.floor(scaled)
    i1 = min(len(points) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * points[i0] + frac * points[i1]
