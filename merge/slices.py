"""mergekit's ``slices:`` for passthrough (frankenmerges): the output's layers are the
listed layer ranges of the listed models, stacked in order and numbered from 0.

As in mergekit 0.1.5, the tensors before the layers (embeddings) come from the first
slice's model and those after them (final norm, LM head) from the last slice's. Which
non-layer tensor is "after" is told by its name: ``lm_head``, ``embed_out`` and ``output``
weights and a final ``norm``, ``ln_f``, ``final_layer_norm`` or ``final_norm``. Every
stacked layer must hold the same tensors with the same shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hivemerge.merge.layers import layer_index, with_layer_index
from hivemerge.protocol.errors import UserInputError

AFTER_LAYERS = re.compile(r"(^|.*\.)(lm_head|embed_out|output)\.weight|(^|.*\.)(norm|ln_f|final_layer_norm|final_norm)\.(weight|bias)")


@dataclass(frozen=True)
class Slice:
    source: int  # index of the model among the recipe's inputs
    key: str  # where the recipe names it, for messages
    shapes: dict[str, tuple[int, ...]]
    start: int
    stop: int


@dataclass
class SlicePlan:
    tensors: dict[str, tuple[int, str]]  # output name -> (input index, source tensor name)
    num_layers: int
    layers: list[int]  # the source layer of each output layer (for per-layer config lists)

    def source(self, name: str) -> tuple[int, str]:
        return self.tensors[name]


def plan_slices(slices: list[Slice]) -> SlicePlan:
    first, last = slices[0], slices[-1]
    tensors = {n: (first.source, n) for n in first.shapes if layer_index(n) is None and not AFTER_LAYERS.fullmatch(n)}
    tensors.update({n: (last.source, n) for n in last.shapes if layer_index(n) is None and AFTER_LAYERS.fullmatch(n)})
    layout, layers = None, []
    for s in slices:
        for i in range(s.start, s.stop):
            names = [n for n in s.shapes if layer_index(n) == i]
            shapes = {with_layer_index(n, 0): s.shapes[n] for n in names}
            if layout is None:
                layout = shapes
            elif shapes != layout:
                raise UserInputError(f"{s.key}: layer {i} does not hold the tensors (and shapes) of the first slice's layers")
            tensors.update({with_layer_index(n, len(layers)): (s.source, n) for n in names})
            layers.append(i)
    return SlicePlan(tensors, len(layers), layers)
