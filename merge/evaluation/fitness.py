"""The fitness of a candidate recipe: merge it in memory with the engine, then score the
merged model on validation suites.

The merged tensors are exactly what ``hivemerge merge`` would write (same engine, same
``out_dtype``), copied into one model object that is reused from candidate to
candidate, so a candidate costs one streaming merge and a few batched forward passes.

Score = mean accuracy - ``loss_weight`` * mean answer loss. Exact-match accuracy on a
few hundred examples moves in coarse steps; the answer loss is smooth and breaks ties
between candidates that get the same answers right.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hivemerge.merge.engine import ReadBuffers, merge_tensor
from hivemerge.merge.evaluation.evaluate import score_examples
from hivemerge.merge.evaluation.suites import Example, validation_suite
from hivemerge.merge.io.models import load_causal_lm
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.merge.numerics.threads import single_thread
from hivemerge.merge.recipe import Recipe, Resolver, validate_recipe
from hivemerge.protocol.content import content_id
from hivemerge.protocol.errors import UserInputError

DEFAULT_LOSS_WEIGHT = 0.25


@dataclass
class Evaluation:
    score: float  # higher is better
    suites: dict[str, dict[str, float]] = field(default_factory=dict)  # suite -> {accuracy, loss}

    def to_json(self) -> dict:
        return {"score": self.score, "suites": self.suites}

    @classmethod
    def from_json(cls, data: dict) -> "Evaluation":
        return cls(float(data["score"]), dict(data.get("suites") or {}))


Fitness = Callable[[dict], Evaluation]  # recipe document -> its evaluation


def validation_suites(names: list[str], count: int) -> dict[str, list[Example]]:
    """Built-in suites as their validation split (never the test examples), or JSONL files as given."""
    if not names:
        raise UserInputError("--suite: give at least one suite")
    if count < 1:
        raise UserInputError(f"--count: must be at least 1, got {count}")
    return {name: validation_suite(name, count) for name in names}


class InMemoryMerger:
    """Merges recipes over the same inputs into one reusable model object."""

    def __init__(self, recipe: Recipe):
        source = recipe.reference.source
        if not isinstance(source, SafetensorsModel):
            raise UserInputError("search needs base_model (or the first model) to be a model directory")
        self.model, self.tokenizer = load_causal_lm(source.directory)
        self.state = self.model.state_dict()
        missing = [n for n in self.state if n not in source.tensors]
        if missing:
            raise UserInputError(f"{source.directory}: the model has tensors the files lack: {missing[:3]}")
        self.buffers = ReadBuffers()

    @torch.no_grad()
    def load(self, recipe: Recipe) -> None:
        device = torch.device("cpu")
        for name, target in self.state.items():
            target.copy_(merge_tensor(recipe, name, device, self.buffers))


class ValidationFitness:
    """Fitness of recipe documents on validation suites (merge in memory, then score)."""

    def __init__(self, suites: dict[str, list[Example]], loss_weight: float = DEFAULT_LOSS_WEIGHT,
                 recipe_dir: Path | None = None, resolver: Resolver | None = None):
        self.suites = suites
        self.loss_weight = loss_weight
        self.recipe_dir = recipe_dir
        self.resolver = resolver
        self._merger: InMemoryMerger | None = None

    def describe(self) -> dict:
        """What the fitness measures: a hash of each suite's examples, and the loss weight."""
        suites = {name: content_id([[e.prompt, e.answer] for e in examples]) for name, examples in self.suites.items()}
        return {"suites": suites, "loss_weight": self.loss_weight}

    def __call__(self, document: dict) -> Evaluation:
        recipe = validate_recipe(document, recipe_dir=self.recipe_dir, resolver=self.resolver)
        with single_thread():
            if self._merger is None:
                self._merger = InMemoryMerger(recipe)
            self._merger.load(recipe)
            results = {}
            for name, examples in self.suites.items():
                accuracy, loss = score_examples(self._merger.model, self._merger.tokenizer, examples)
                results[name] = {"accuracy": accuracy, "loss": loss}
        accuracy = sum(r["accuracy"] for r in results.values()) / len(results)
        loss = sum(r["loss"] for r in results.values()) / len(results)
        return Evaluation(accuracy - self.loss_weight * loss, results)
