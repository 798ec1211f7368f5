"""What a layer-wise recipe search varies, and how a search vector becomes a recipe.

The space is built from an ordinary recipe (the start point). For every merged model
and every searched parameter (``weight``, and ``density`` when the method has it) it
holds one coordinate per block of layers plus one for the tensors outside the layers
(embeddings, final norm, LM head). A vector of the search lives in [0, 1]^d; coordinate
``c`` maps linearly onto its parameter's bounds, and the recipe it stands for is the
input recipe with each searched parameter replaced by a per-layer table
``{per_layer: [...], default: v}`` (values rounded to 4 decimals, so the recipe written
out is exactly the one that was evaluated).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivemerge.merge.layers import layer_index, natural_key
from hivemerge.merge.recipe import Recipe, resolve_model_path
from hivemerge.protocol.content import ID_PREFIX
from hivemerge.protocol.errors import UserInputError

SEARCHED = ("weight", "density")
DIGITS = 4
MIN_DENSITY = 0.1  # density is (0, 1]; near 0 a task vector vanishes, a waste of the budget


@dataclass(frozen=True)
class Coordinate:
    model: int  # index in the recipe document's ``models``
    param: str  # weight or density
    block: int | None  # None: the tensors outside the layers
    low: float
    high: float

    @property
    def label(self) -> str:
        where = "default" if self.block is None else f"block{self.block}"
        return f"models[{self.model}].{self.param}.{where}"

    def value(self, u: float) -> float:
        u = min(1.0, max(0.0, float(u)))
        return round(self.low + (self.high - self.low) * u, DIGITS)

    def unit(self, value: float) -> float:
        if self.high == self.low:
            return 0.0
        return min(1.0, max(0.0, (float(value) - self.low) / (self.high - self.low)))


def split_blocks(num_layers: int, blocks: int) -> list[list[int]]:
    """``blocks`` contiguous runs of layers, as equal as possible (earlier ones shorter)."""
    return [list(range(b * num_layers // blocks, (b + 1) * num_layers // blocks)) for b in range(blocks)]


class SearchSpace:
    def __init__(self, recipe: Recipe, blocks: int | None = None, max_weight: float = 2.0,
                 min_density: float = MIN_DENSITY, recipe_dir: Path | None = None):
        method = recipe.method
        params = [s.name for s in method.model_params if s.name in SEARCHED and not s.ignored]  # not what changes nothing
        if "weight" not in params:
            raise UserInputError(
                f"merge_method: {method.name} has no per-model weight to search; use task_arithmetic, ties, "
                "dare_ties, dare_linear, breadcrumbs or linear"
            )
        layers = recipe.num_layers
        if layers < 1:
            raise UserInputError("the recipe's models have no layers to search over")
        blocks = layers if blocks is None else blocks
        if not 1 <= blocks <= layers:
            raise UserInputError(f"--blocks: must be between 1 and the number of layers ({layers}), got {blocks}")
        if not max_weight > 0:
            raise UserInputError(f"--max-weight: must be positive, got {max_weight}")
        self.document = _portable(recipe.document, recipe_dir)
        self.num_layers = layers
        self.blocks = split_blocks(layers, blocks)
        self.params = params
        names = sorted((n for n, i in recipe.reference.source.tensors.items() if i.dtype.is_floating_point), key=natural_key)
        outside = next((n for n in names if layer_index(n) is None), None)
        in_layer = {i: next(n for n in names if layer_index(n) == i) for i in range(layers)}

        self.coords: list[Coordinate] = []
        start: list[float] = []
        for model in recipe.inputs:
            for param in params:
                spec = method.param_spec(param)
                low, high = (0.0, max_weight) if param == "weight" else (max(min_density, spec.low or 0.0), spec.high or 1.0)
                for block in [None, *range(len(self.blocks))]:
                    coord = Coordinate(model.recipe_index, param, block, low, high)
                    tensors = [outside] if block is None else [in_layer[i] for i in self.blocks[block]]
                    tensors = [t for t in tensors if t is not None] or [in_layer[0]]
                    values = [recipe.model_params_for(model, t)[param] for t in tensors]
                    self.coords.append(coord)
                    start.append(coord.unit(sum(values) / len(values)))
        self.start = start

    @property
    def dimension(self) -> int:
        return len(self.coords)

    def describe(self) -> dict:
        """What identifies the space (a checkpoint must come from the same one)."""
        return {
            "recipe": self.document,
            "blocks": self.blocks,
            "coordinates": [[c.label, c.low, c.high] for c in self.coords],
        }

    def values(self, x: Sequence[float]) -> list[float]:
        if len(x) != self.dimension:
            raise ValueError(f"expected a vector of {self.dimension} values, got {len(x)}")
        return [c.value(u) for c, u in zip(self.coords, x)]

    def recipe(self, x: Sequence[float]) -> dict:
        """The recipe document that the search vector ``x`` stands for."""
        values = self.values(x)
        document = copy.deepcopy(self.document)
        models = document["models"]
        tables: dict[tuple[int, str], dict[str, Any]] = {}
        for c, v in zip(self.coords, values):
            table = tables.setdefault((c.model, c.param), {"per_layer": [None] * self.num_layers, "default": None})
            if c.block is None:
                table["default"] = v
            else:
                for layer in self.blocks[c.block]:
                    table["per_layer"][layer] = v
        for (index, param), table in tables.items():
            entry = models[index] if isinstance(models[index], dict) else {"model": models[index]}
            entry = models[index] = {**entry, "parameters": {**(entry.get("parameters") or {}), param: table}}
        return document


def _portable(document: dict, recipe_dir: Path | None) -> dict:
    """The recipe with local model paths made absolute, so the searched recipe works
    wherever it is written."""
    document = copy.deepcopy(document)

    def fix(ref: Any) -> Any:
        if not isinstance(ref, str) or ref.startswith(ID_PREFIX):
            return ref
        return str(resolve_model_path(ref, recipe_dir).resolve())

    if "base_model" in document:
        document["base_model"] = fix(document["base_model"])
    models = []
    for entry in document.get("models") or []:
        if isinstance(entry, str):
            entry = {"model": entry}
        models.append({**entry, "model": fix(entry.get("model"))})
    document["models"] = models
    tok = document.get("tokenizer_source")
    if isinstance(tok, str) and tok not in ("base",):
        bare = tok.removeprefix("model:")
        document["tokenizer_source"] = fix(bare)
    return document
