"""The streaming merge engine: a validated recipe in, a Hugging Face model directory out.

Tensors are processed one at a time in the reference model's (natural) order: read
from each input's file, moved to the merge device, converted to the recipe's
``dtype`` (by the engine, or chunk by chunk by methods that convert inputs
themselves), merged by the method, cast to ``out_dtype`` and written to its planned
place in the output shards. Peak memory is a few tensors per input.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from hivemerge.merge.deltas.delta import DeltaSource
from hivemerge.merge.io.atomic import atomic_directory
from hivemerge.merge.io.model_card import copy_tokenizer, write_config, write_model_card
from hivemerge.merge.io.writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter
from hivemerge.merge.layers import natural_key
from hivemerge.merge.methods import TensorJob
from hivemerge.merge.numerics import exact, placement
from hivemerge.merge.numerics.threads import limit_allocator_arenas
from hivemerge.merge.recipe import ModelInput, Recipe
from hivemerge.protocol.errors import ComputationError, UserInputError

# progress(done_tensors, total_tensors, tensor_name)
Progress = Callable[[int, int, str], None]


@dataclass
class MergeResult:
    out_dir: Path
    files: list[str]
    tensors: int
    seconds: float
    device: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is available (use auto or cpu)")
    if device not in ("cpu", "cuda"):
        raise UserInputError(f"--device: expected auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def output_layout(recipe: Recipe) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every output tensor, in writing order."""
    if recipe.slices is not None:  # a frankenmerge: each output tensor is one source tensor, renumbered
        layout = []
        for name in sorted(recipe.slices.tensors, key=natural_key):
            index, source_name = recipe.slices.source(name)
            info = recipe.inputs[index].source.tensors[source_name]
            layout.append((name, recipe.out_dtype if info.dtype.is_floating_point else info.dtype, info.shape))
        return layout
    tensors = recipe.reference.source.tensors
    layout = []
    for name in sorted(tensors, key=natural_key):
        info = tensors[name]
        dtype = recipe.out_dtype if info.dtype.is_floating_point else info.dtype
        layout.append((name, dtype, recipe.vocab.shape(name, info.shape) if recipe.vocab else info.shape))
    return layout


class ReadBuffers:
    """A byte buffer per input, reused from tensor to tensor: reading into memory that
    is already mapped spares the page faults of fresh memory on every tensor."""

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def take(self, model: ModelInput, name: str) -> torch.Tensor:
        info = model.source.tensors[name]
        size = math.prod(info.shape) * info.dtype.itemsize
        buffer = self._buffers.get(model.recipe_index)
        if buffer is None or buffer.numel() < size:
            buffer = self._buffers[model.recipe_index] = torch.empty(size, dtype=torch.uint8)
        return buffer

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lies in one of the buffers (the next read overwrites it)."""
        pointer = tensor.untyped_storage().data_ptr()
        return any(b.untyped_storage().data_ptr() == pointer for b in self._buffers.values())


class OutputBuffers:
    """Two byte buffers the merged tensors are written into, in turn: one is being
    written to disk (WriteBehind) while the next tensor is merged into the other. Fresh
    memory for every tensor cost its page faults, which on a virtual machine were a
    tenth of a 1.1B merge's time."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8)] * 2
        self._turn = 0

    def next(self, size: int) -> torch.Tensor:
        self._turn ^= 1
        if self._buffers[self._turn].numel() < size:
            self._buffers[self._turn] = torch.empty(size, dtype=torch.uint8)
        return self._buffers[self._turn]


class WriteBehind:
    """Writes each merged tensor from a thread of its own while the next one is merged:
    copying into the page cache (the I/O floor's larger part) overlaps the arithmetic.
    At most one tensor waits to be written; tensors are written in the order given."""

    def __init__(self, writer: ShardedWriter):
        self._writer = writer
        self._thread = ThreadPoolExecutor(1)
        self._pending = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.wait()
        self._pending = self._thread.submit(self._writer.write, name, tensor)

    def wait(self) -> None:
        """Until the tensor last given is written (its error, if any, raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._thread.shutdown()

    def discard(self) -> None:
        """Let the pending write end, ignoring its outcome (a failure is already on its way)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.exception()
        self._thread.shutdown()


def merge_tensor(recipe: Recipe, name: str, device: torch.device, buffers: ReadBuffers | None = None,
                 into: torch.Tensor | None = None) -> torch.Tensor:
    """The merged value of one tensor, on the CPU in the output dtype (it may view
    ``buffers`` or ``into``, a byte buffer for the result: write it before they are reused)."""
    if recipe.slices is not None:
        index, source_name = recipe.slices.source(name)
        tensor = recipe.inputs[index].source.get(source_name)
        if not tensor.is_floating_point():
            return tensor
        return _finite_or_refused(tensor.to(recipe.out_dtype), recipe.method.name, name)  # e.g. past float16's range
    reference = recipe.reference.source
    if not reference.tensors[name].dtype.is_floating_point:
        return reference.get(name)  # integer buffers (position ids, masks) pass through

    method = recipe.method
    if recipe.vocab is not None and name in recipe.vocab.tensors:
        return _merge_token_rows(recipe, name, device)

    def read(model: ModelInput) -> torch.Tensor:
        into = buffers.take(model, name) if buffers is not None else None
        if stored_base is not None and isinstance(model.source, DeltaSource) and model.source.base is recipe.base.source:
            return model.source.get_over(name, stored_base, into)  # the base read once, not again for each delta
        return model.source.get(name, into)

    def prepared(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(device)
        return tensor if method.converts_inputs else tensor.to(recipe.dtype)

    stored_base = None  # read first: the deltas are decoded from it
    if recipe.base is not None and (method.requires_base or method.uses_base):
        stored_base = read(recipe.base)
    models = [prepared(read(m)) for m in recipe.inputs]  # one at a time: a read and a decode are split among the workers
    job = TensorJob(
        name=name,
        base=prepared(stored_base) if stored_base is not None else None,
        models=models,
        model_params=[recipe.model_params_for(m, name) for m in recipe.inputs],
        params=recipe.global_params_for(name),
        dtype=recipe.dtype,
        out_dtype=recipe.out_dtype,
        model_ids=[m.recipe_index for m in recipe.inputs],
        seed=recipe.seed,
        into=into if placement.cpu_ways(device) else None,
    )
    return _finite_or_refused(method.merge(job).to(recipe.out_dtype), method.name, name).cpu()


def _merge_token_rows(recipe: Recipe, name: str, device: torch.device) -> torch.Tensor:
    """An embedding or LM head over lined-up vocabularies (merge/io/vocab.py): the rows of
    the tokens every input has, merged by the method; each other token's row, the mean of
    the rows of the inputs that have it (the row itself where one input has it)."""
    plan, method = recipe.vocab, recipe.method
    uses_base = recipe.base is not None and (method.requires_base or method.uses_base)
    everyone = ([recipe.base] if uses_base else []) + list(recipe.inputs)
    whole = {m.recipe_index: m.source.get(name).to(device) for m in everyone}
    common = [t for t in range(len(plan.tokens)) if all(plan.rows[i][t] >= 0 for i in whole)]

    def rows(model: ModelInput, tokens: list[int]) -> torch.Tensor:
        picked = whole[model.recipe_index].index_select(0, torch.tensor([plan.rows[model.recipe_index][t] for t in tokens],
                                                                          dtype=torch.long, device=device))
        return picked if method.converts_inputs else picked.to(recipe.dtype)

    out = torch.empty(plan.shape(name, whole[everyone[0].recipe_index].shape), dtype=recipe.out_dtype)
    if common:
        job = TensorJob(name=name, base=rows(recipe.base, common) if uses_base else None,
                        models=[rows(m, common) for m in recipe.inputs],
                        model_params=[recipe.model_params_for(m, name) for m in recipe.inputs],
                        params=recipe.global_params_for(name), dtype=recipe.dtype, out_dtype=recipe.out_dtype,
                        model_ids=[m.recipe_index for m in recipe.inputs], seed=recipe.seed)
        out[torch.tensor(common, dtype=torch.long)] = method.merge(job).to(recipe.out_dtype).cpu()
    for token in sorted(set(range(len(plan.tokens))) - set(common)):
        having = [m for m in recipe.inputs if plan.rows[m.recipe_index][token] >= 0]
        total = None
        for m in having:  # in recipe order, float32: the same sum on every device
            row = whole[m.recipe_index][plan.rows[m.recipe_index][token]].to(torch.float32)
            total = row.clone() if total is None else total.add_(row)
        out[token] = exact.divide(total, len(having)).to(recipe.out_dtype).cpu()
    return _finite_or_refused(out, method.name, name)


def _finite_or_refused(merged: torch.Tensor, method: str, name: str) -> torch.Tensor:
    """``merged``, unless it holds NaN or Inf: whatever the method, such a model is never written."""
    if not exact.all_finite(merged):
        raise ComputationError(f"{method} produced NaN or Inf values in tensor {name}; nothing was written")
    return merged


def run_merge(
    recipe: Recipe,
    out_dir: str | Path,
    device: str = "auto",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    started = time.perf_counter()
    limit_allocator_arenas()  # before the merge's threads allocate: freed memory is reused, not kept per thread
    dev = resolve_device(device)
    layout = output_layout(recipe)
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        writer = ShardedWriter(staging, layout, max_shard_bytes)
        behind = WriteBehind(writer)
        buffers, outputs = ReadBuffers(), OutputBuffers()
        try:
            for i, (name, dtype, shape) in enumerate(layout):
                merged = merge_tensor(recipe, name, dev, buffers, outputs.next(math.prod(shape) * dtype.itemsize))
                behind.write(name, merged.clone() if buffers.holds(merged) else merged)  # the next read reuses the buffers
                if progress:
                    progress(i + 1, len(layout), name)
            behind.close()
            files = writer.finish()
        except BaseException:
            behind.discard()  # the error raised here is the cause; a pending write's own is dropped
            raise
        finally:
            writer.abort()
        write_config(recipe, staging)
        files += copy_tokenizer(recipe, staging)
        write_model_card(recipe, staging)
    return MergeResult(Path(out_dir), files, len(layout), time.perf_counter() - started, str(dev))
