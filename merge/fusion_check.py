"""A round's fusion step, on local files: the fuser's run and every participant's check.

The fuser distils the packs into the round's base (:func:`distill.fuse_into_pivot`)
and measures the probe losses of the base and of the *delta applied to the base* (not
of the trained model: the delta's codec rounds it, and the others only ever see the
delta). A participant rebuilds the same fused targets from the same packs and probe,
applies the same delta and measures the same two figures with the same function, so
an honest fuser's figures match to float noise. The figures are mean per-token
cross-entropies on the probe's response tokens (``lm``: the reference tokens;
``fused``: the fused distributions). Everything runs on one thread.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hivemerge.merge.delta import apply_delta
from hivemerge.merge.distill import (
    DistillConfig, PivotExample, fuse_into_pivot, pivot_view, pivot_vocab, probe_losses, targets,
)
from hivemerge.merge.fuse import fuse_examples
from hivemerge.merge.packs import PackFile, load_causal_lm
from hivemerge.merge.probe import ProbeSet
from hivemerge.protocol.identity import Identity


def distill_config(block: dict) -> DistillConfig:
    """The distillation settings of a round's ``fusion`` block (checked as ``hivemerge fuse`` checks them)."""
    config = DistillConfig(lam=float(block["lambda"]), steps=block["steps"], lr=float(block["lr"]), batch=block["batch"],
                           seed=block["seed"])
    config.check()
    return config


def fused_targets(base_dir: Path, packs: list[PackFile], probe: ProbeSet, method: str, lam: float) -> tuple[list[PivotExample], int]:
    """The probe examples in the base's tokenization with their fused target distributions."""
    from transformers import AutoTokenizer

    for pack in packs:
        pack.check_probe(probe)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded, texts = pivot_view(tokenizer, probe)
    fused, _ = fuse_examples([p.load() for p in packs], texts, [ids[first:] for ids, first in encoded],
                             pivot_vocab(tokenizer), method)
    return targets(encoded, fused, lam), pad


def measure(model_dir: Path, examples: list[PivotExample], pad: int) -> dict[str, float]:
    model, _ = load_causal_lm(model_dir)
    return probe_losses(model, examples, pad)


def measure_fused(base_dir: Path, delta_path: Path, packs: list[PackFile], probe: ProbeSet, block: dict,
                  scratch: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(base figures, fused-model figures): what every participant recomputes."""
    examples, pad = fused_targets(Path(base_dir), packs, probe, block["method"], float(block["lambda"]))
    try:
        apply_delta(base_dir, delta_path, scratch, overwrite=True)
        return measure(Path(base_dir), examples, pad), measure(scratch, examples, pad)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_fusion(base_dir: Path, packs: list[PackFile], probe: ProbeSet, block: dict, identity: Identity,
               delta_out: Path, scratch: Path) -> tuple[dict[str, float], dict[str, float]]:
    """The fuser's work: distil, write the signed delta to ``delta_out``, and return the
    figures the fusion record states (measured as every participant will measure them)."""
    try:
        fuse_into_pivot(base_dir, packs, probe, scratch / "fused", block["method"], distill_config(block), identity,
                        delta_out, block["codec"], overwrite=True)
        return measure_fused(base_dir, delta_out, packs, probe, block, scratch / "applied")
    finally:
        shutil.rmtree(scratch / "fused", ignore_errors=True)
