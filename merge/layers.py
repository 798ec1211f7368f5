"""Where a tensor sits in the stack of layers.

Gradients (a parameter given as a list) and per-layer tables are evaluated at a
tensor's position. As in mergekit 0.1.5 (``plan.py``), a tensor of layer ``i`` out of
``L`` sits at ``t = i / (L - 1)`` (``t = 1`` when there is a single layer), and every
tensor outside the layers (embeddings, final norm, LM head) at ``t = 0``, so existing
recipes with gradients give the same values in both tools.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# model.layers.3.mlp..., transformer.h.3..., gpt_neox.layers.3..., blocks.3...
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # where configs say how many layers
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    match = _LAYER_RE.search(tensor_name)
    return int(match.group(1)) if match else None


def with_layer_index(tensor_name: str, index: int) -> str:
    """The name of the same tensor in layer ``index`` (slices renumber stacked layers)."""
    match = _LAYER_RE.search(tensor_name)
    if match is None:
        return tensor_name
    return f"{tensor_name[: match.start(1)]}{index}{tensor_name[match.end(1):]}"


def count_layers(tensor_names: Iterable[str], config: dict | None = None) -> int:
    """Number of layers: from the config when it says, else from the tensor names."""
    for key in LAYER_COUNT_KEYS:
        if config and isinstance(config.get(key), int):
            return config[key]
    indices = [i for i in map(layer_index, tensor_names) if i is not None]
    return max(indices) + 1 if indices else 0


def layer_position(tensor_name: str, num_layers: int) -> float:
    """The gradient coordinate ``t`` in [0, 1] of a tensor."""
    index = layer_index(tensor_name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def natural_key(tensor_name: str) -> tuple:
    """Sort key that orders layer 2 before layer 10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", tensor_name))
