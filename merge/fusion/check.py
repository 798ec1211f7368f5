"""A round's fusion step, on local files: the fuser's run and every participant's check.

The fuser distils the packs into the round's base (:func:`distill.fuse_into_pivot`)
and measures the probe losses of the base and of the *delta applied to the base* (not
of the trained model: the delta's codec rounds it, and the others only ever see the
delta). A participant rebuilds the same fused targets from the same packs and probe,
applies the same delta and measures the same two figures with the same function, so
an honest fuser's figures match to float noise. The figures are mean per-token
cross-entropies on the probe's response tokens (``lm``: the reference tokens;
``fused``: the fused distributions). With a replay set the fuser distils with it (the
base's own distribution there as the target) and both measure a third figure,
``replay``: the CE to the base's own top-k distribution on the replay responses, whose
rise from base to fused model is the drift. Everything runs on one thread.

With a round's ``pivot: merge`` the *reference* is the round's weight merge
(``pivot_dir``) instead of the base: the fuser distils into it, the "before" figures and
the replay targets are its own, and the delta is still taken against the base, so the
"after" model is the base with the delta applied, as everywhere else.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hivemerge.merge.deltas.delta import apply_delta
from hivemerge.merge.fusion.distill import (
    DistillConfig,
    PivotExample,
    fuse_into_pivot,
    pivot_view,
    pivot_vocab,
    probe_losses,
    self_targets,
    targets,
)
from hivemerge.merge.fusion.fuse import fuse_examples
from hivemerge.merge.fusion.packs import PackFile
from hivemerge.merge.fusion.probe import ProbeSet
from hivemerge.merge.io.models import load_causal_lm
from hivemerge.merge.io.tokens import pad_id
from hivemerge.protocol.identity import Identity


def distill_config(block: dict) -> DistillConfig:
    """The distillation settings of a round's ``fusion`` block (checked as ``hivemerge fuse`` checks them)."""
    config = DistillConfig(lam=float(block["lambda"]), steps=block["steps"], lr=float(block["lr"]), batch=block["batch"],
                           seed=block["seed"], replay_share=float(block.get("replay_share", DistillConfig.replay_share)))
    config.check()
    return config


def fused_targets(base_dir: Path, packs: list[PackFile], probe: ProbeSet, method: str, lam: float) -> tuple[list[PivotExample], int]:
    """The probe examples in the base's tokenization with their fused target distributions."""
    from transformers import AutoTokenizer  # heavy: transformers, only when a fusion is checked

    for pack in packs:
        pack.check_probe(probe)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad = pad_id(tokenizer)
    encoded, texts = pivot_view(tokenizer, probe)
    fused, _ = fuse_examples([p.load() for p in packs], texts, [ids[first:] for ids, first in encoded],
                             pivot_vocab(tokenizer), method)
    return targets(encoded, fused, lam), pad


def measure(model, examples: list[PivotExample], pad: int, replayed: list[PivotExample] | None) -> dict[str, float]:
    figures = probe_losses(model, examples, pad)
    if replayed is not None:
        figures["replay"] = probe_losses(model, replayed, pad)["fused"]  # CE to the base's own distribution
    return figures


def measure_fused(base_dir: Path, delta_path: Path, packs: list[PackFile], probe: ProbeSet, block: dict,
                  scratch: Path, replay: ProbeSet | None = None, pivot_dir: Path | None = None
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """(reference figures, fused-model figures): what every participant recomputes (with
    ``replay``, the replay set the block names, the third figure too). The reference is
    ``pivot_dir`` (a round's weight merge) if given, else the base; the fused model is
    always the base with the delta applied."""
    reference_dir = Path(pivot_dir) if pivot_dir is not None else Path(base_dir)
    examples, pad = fused_targets(reference_dir, packs, probe, block["method"], float(block["lambda"]))
    reference, tokenizer = load_causal_lm(reference_dir)
    replayed = None
    if replay is not None:
        replayed = self_targets(reference, pivot_view(tokenizer, replay)[0], pad, distill_config(block).replay_top_k)
    try:
        apply_delta(base_dir, delta_path, scratch, overwrite=True)
        before = measure(reference, examples, pad, replayed)
        del reference
        return before, measure(load_causal_lm(scratch)[0], examples, pad, replayed)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_fusion(base_dir: Path, packs: list[PackFile], probe: ProbeSet, block: dict, identity: Identity,
               delta_out: Path, scratch: Path, replay: ProbeSet | None = None, pivot_dir: Path | None = None
               ) -> tuple[dict[str, float], dict[str, float]]:
    """The fuser's work: distil into the pivot (the base, or ``pivot_dir``; held to itself on
    ``replay``), write the signed delta against the base to ``delta_out``, and return the
    figures the fusion record states (measured as every participant will measure them)."""
    try:
        fuse_into_pivot(pivot_dir if pivot_dir is not None else base_dir, packs, probe, scratch / "fused", block["method"],
                        distill_config(block), identity, delta_out, block["codec"], overwrite=True, replay=replay,
                        delta_base=base_dir)
        return measure_fused(base_dir, delta_out, packs, probe, block, scratch / "applied", replay, pivot_dir)
    finally:
        shutil.rmtree(scratch / "fused", ignore_errors=True)
