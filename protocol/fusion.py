"""Fusion in merge rounds: the round recipe's ``fusion`` block and the rules that judge a fused delta.

A round may carry a fusion step: heterogeneous experts published logit packs on a
probe set; one designated node (the *fuser*, by default the proposer) fuses them into
the round's base, publishes the result as a delta like any expert's, commits it under
the domain :data:`FUSED_DOMAIN` and stores a signed fusion record naming the packs,
the probe and the probe losses of the base and of the fused model. The fuser is
designated because training is not bit-reproducible across machines: the others do
not redo it, they check it. Every participant recomputes the two probe losses (the
packs and the probe are small and content-addressed; the fused delta is fetched
anyway) and excludes the fused delta, with the reason, when the fuser's figures are
off by more than the tolerance or the fused model is not better on the probe.

A round may also name a *replay set*: prompts of the base's own domains with the
base's own answers, in the probe's format (a content-addressed JSONL stored and served
like a probe set). The fuser mixes it into every batch (``replay_share``) with the
base's own distribution as the target, so distillation on a narrow probe does not
wash out what the base knew. The fusion record names it, and every participant
measures the fused model's drift there: the rise in cross-entropy to the base's own
(top-k) distribution on the replay responses. A fused delta that drifts by more than
the proposal's ``max_drift`` is excluded, whatever it gained on the probe.

A round may name the *pivot* the fuser distils into: ``base`` (the default) or
``merge``, the round's weight merge of the expert deltas the proposal pins
(``pivot_deltas``: delta id -> domain, resolved from ``select`` when proposed). Then
the packs heal what the weight merge lost, and the fused delta (still a delta against
the base) *replaces* the merge: the round's result is the base plus the fused delta.
Every participant builds the same pivot from the proposal and measures the "before"
figures on it; a fused delta is excluded unless the round merges exactly the pinned
deltas (else its pivot is not the round's merge), and the round's result is then the
plain weight merge.

Pure: no model math, no network. The figures are mean per-token cross-entropies on
the probe's response tokens, ``lm`` against the reference tokens and ``fused``
against the fused distributions; the *probe loss* is the distillation objective
``lambda * lm + (1 - lambda) * fused``. With a replay set there is a third figure,
``replay``: the mean per-token cross-entropy to the base's own top-k distribution on the
replay responses; the drift is ``after.replay - before.replay``.
"""

from __future__ import annotations

from typing import Any

from hivemerge.protocol import bounds
from hivemerge.protocol.content import is_content_id
from hivemerge.protocol.errors import UserInputError

FUSED_DOMAIN = "fused"  # the domain a fuser commits its fused delta under
FIGURES = ("lm", "fused")
REPLAY_FIGURE = "replay"  # only with a replay set
METHODS = ("mince", "avgce")  # merge/fusion/fuse.py's methods; defined here, as protocol/ imports nothing from merge/
# Distillation settings: one declaration for a round's fusion block (below), `hivemerge
# fuse` and merge/fusion/distill.py's DistillConfig. Chosen by measurement on the demo's
# experts (docs/benchmarks.md): MinCE, lambda 0.5, 300 steps of lr 5e-4 and batch 48 bring
# every domain of the demo round's weight merge within 2.5 points of its expert. Half of
# every batch from the replay set (when one is named) is what MAX_DRIFT was measured with:
# a quarter let the round test's fusion drift past it.
DISTILLATION: dict[str, Any] = {
    "method": "mince", "lambda": 0.5, "steps": 300, "lr": 5e-4, "batch": 48, "seed": 0, "replay_share": 0.5,
}
DEFAULTS: dict[str, Any] = {
    **DISTILLATION, "codec": "int8",
    "tolerance": 1e-3,
    # The most the fused model may drift on the replay set, in nats per token. Measured
    # (docs/fusion.md): the benchmark's fusion drifts 0.034 with replay and 1.05 without; the
    # round test's 20-step fusion -0.04 with, 0.22 without. 0.1 keeps a held fusion with a 3x
    # margin and excludes one that forgets.
    "max_drift": 0.1,
    "pivot": "base",
}
PIVOTS = ("base", "merge")
BLOCK_KEYS = {"packs", "probe", "fuser", "replay", "pivot_deltas", *DEFAULTS}
MAX_STEPS = bounds.MAX_FUSION_STEPS


_number = bounds.finite_number


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_fusion_block(block: Any, resolved: bool = False) -> dict:
    """The ``fusion`` block of a round recipe, with defaults filled in; raises UserInputError
    naming the key. ``resolved``: as it must be in a proposal (pack ids, the probe id and
    the fuser's key), not as a user may write it (packs by domain, probe and fuser left out)."""
    if not isinstance(block, dict):
        raise UserInputError("fusion: must be a mapping (packs, probe, method, lambda, steps, lr, batch, seed, codec, fuser, "
                             "tolerance, replay, replay_share, max_drift, pivot)")
    unknown = sorted(set(block) - BLOCK_KEYS)
    if unknown:
        raise UserInputError(f"fusion.{unknown[0]}: unknown key; expected {sorted(BLOCK_KEYS)}")
    out = {**DEFAULTS, **block}
    packs = out.get("packs")
    if not isinstance(packs, dict) or len(packs) != 1 or not (
        isinstance(packs.get("ids"), list) or isinstance(packs.get("domains"), list)
    ):
        raise UserInputError("fusion.packs: required; {domains: [NAME, ...]} or {ids: [PACK ID, ...]}")
    names = packs.get("ids", packs.get("domains"))
    if not names or not all(isinstance(n, str) and n for n in names):
        raise UserInputError("fusion.packs: list at least one pack id or domain")
    if len(names) > bounds.MAX_PACKS:
        raise UserInputError(f"fusion.packs: at most {bounds.MAX_PACKS} packs or domains")
    if "ids" in packs:
        bad = [n for n in names if not is_content_id(n)]
        if bad:
            raise UserInputError(f"fusion.packs.ids: {bad[0]!r} is not a content id")
        out["packs"] = {"ids": sorted(set(names))}
    elif resolved:
        raise UserInputError("fusion.packs: a proposal names its packs by id")
    for key in ("probe", "fuser"):
        value = out.get(key)
        if value is None and not resolved:
            continue
        if key == "probe" and not (isinstance(value, str) and is_content_id(value.removeprefix("hm://"))):
            raise UserInputError(f"fusion.probe: {value!r} is not a probe id")
        if key == "fuser" and not (isinstance(value, str) and len(value) == 64 and is_content_id(value)):
            raise UserInputError(f"fusion.fuser: {value!r} is not a node's public key (64 hex characters)")
    if isinstance(out.get("probe"), str):
        out["probe"] = out["probe"].removeprefix("hm://")
    replay = out.get("replay")
    if replay is not None or resolved:
        out["replay"] = replay = replay.removeprefix("hm://") if isinstance(replay, str) else replay
        # As a user writes it, a replay set may be a JSONL file the proposer stores and serves.
        if not (replay is None or (isinstance(replay, str) and replay and (is_content_id(replay) or not resolved))):
            raise UserInputError(f"fusion.replay: {replay!r} is not a replay set id" + ("" if resolved else " or a file"))
    if out["method"] not in METHODS:
        raise UserInputError(f"fusion.method: must be one of {list(METHODS)}, got {out['method']!r}")
    if not _number(out["lambda"]) or not 0.0 <= out["lambda"] <= 1.0:
        raise UserInputError(f"fusion.lambda: must be in [0, 1], got {out['lambda']!r}")
    if not _count(out["steps"]) or not 1 <= out["steps"] <= MAX_STEPS:
        raise UserInputError(f"fusion.steps: must be an integer in [1, {MAX_STEPS}], got {out['steps']!r}")
    if not _number(out["lr"]) or not 0 < out["lr"] <= 1:
        raise UserInputError(f"fusion.lr: must be in (0, 1], got {out['lr']!r}")
    if not _count(out["batch"]) or not 1 <= out["batch"] <= bounds.MAX_FUSION_BATCH:
        raise UserInputError(f"fusion.batch: must be an integer in [1, {bounds.MAX_FUSION_BATCH}], got {out['batch']!r}")
    if out["steps"] * out["batch"] > bounds.MAX_FUSION_EXAMPLES:  # the distillation work one proposal may ask of its fuser
        raise UserInputError(f"fusion: steps x batch is {out['steps'] * out['batch']}, more than {bounds.MAX_FUSION_EXAMPLES}")
    if not _count(out["seed"]) or out["seed"] < 0:
        raise UserInputError(f"fusion.seed: must be a non-negative integer, got {out['seed']!r}")
    if not isinstance(out["codec"], str) or not out["codec"]:
        raise UserInputError(f"fusion.codec: must be a codec name, got {out['codec']!r}")
    if not _number(out["tolerance"]) or not 0 < out["tolerance"] <= 1:
        raise UserInputError(f"fusion.tolerance: must be in (0, 1], got {out['tolerance']!r}")
    if not _number(out["replay_share"]) or not 0 <= out["replay_share"] < 1:
        raise UserInputError(f"fusion.replay_share: must be in [0, 1), got {out['replay_share']!r}")
    if not _number(out["max_drift"]) or not 0 < out["max_drift"] <= 100:
        raise UserInputError(f"fusion.max_drift: must be in (0, 100] (nats per token), got {out['max_drift']!r}")
    _check_pivot(out, resolved)
    return out


def _check_pivot(out: dict, resolved: bool) -> None:
    if out["pivot"] not in PIVOTS:
        raise UserInputError(f"fusion.pivot: must be one of {list(PIVOTS)}, got {out['pivot']!r}")
    pinned = out.get("pivot_deltas")
    if out["pivot"] == "base":
        if pinned is not None:
            raise UserInputError("fusion.pivot_deltas: only with pivot: merge")
        return
    if pinned is None and not resolved:
        return  # the proposer pins them from the round's select
    if not isinstance(pinned, dict) or not pinned:
        raise UserInputError("fusion.pivot_deltas: a proposal with pivot: merge names the deltas it merges (delta id -> domain)")
    for delta_id, domain in pinned.items():
        if not is_content_id(delta_id):
            raise UserInputError(f"fusion.pivot_deltas: {delta_id!r} is not a delta id")
        if not isinstance(domain, str) or not domain or domain == FUSED_DOMAIN:
            raise UserInputError(f"fusion.pivot_deltas: delta {delta_id[:12]} needs an expert's domain, got {domain!r}")


def merges_pivot(block: dict | None) -> bool:
    """Whether the fusion step distils into the round's weight merge (whose result it then replaces)."""
    return isinstance(block, dict) and block.get("pivot") == "merge"


def pivot_reason(block: dict, kept: list[str], domains: dict[str, str]) -> str | None:
    """Why a fused delta distilled into the weight merge of ``pivot_deltas`` cannot stand
    for this round (None: it can). ``kept``: the expert deltas the round merges; they must
    be exactly the pinned ones, committed under the pinned domains. Otherwise the result
    is the round's plain weight merge (no expert is silently dropped or added)."""
    extra = sorted(set(kept) - set(block["pivot_deltas"]))
    if extra:
        return f"fusion: this round includes delta {extra[0][:12]}, which the pivot does not merge"
    for delta_id, domain in sorted(block["pivot_deltas"].items()):
        if delta_id not in kept:
            return f"fusion: the pivot merges delta {delta_id[:12]}, which this round does not include"
        if domains.get(delta_id) != domain:
            return (f"fusion: the pivot merges delta {delta_id[:12]} as {domain!r}, but it was committed as "
                    f"{domains.get(delta_id)!r}")
    return None


def check_figures(figures: Any, replay: bool = False) -> bool:
    """``{lm, fused}``, plus ``replay`` exactly when the fusion had a replay set; all finite."""
    names = (*FIGURES, REPLAY_FIGURE) if replay else FIGURES
    return isinstance(figures, dict) and set(figures) == set(names) and all(_number(figures[k]) for k in names)


def probe_loss(figures: dict, lam: float) -> float:
    return lam * figures["lm"] + (1 - lam) * figures["fused"]


def fused_deltas(commitments: dict[str, dict]) -> dict[str, str]:
    """delta id -> committer, of every delta committed under the fused domain."""
    return {d: node for node, c in sorted(commitments.items()) for d in c["delta_ids"]
            if c["domains"].get(d) == FUSED_DOMAIN}


def record_reason(block: dict, committer: str, delta_id: str, record: dict | None) -> str | None:
    """Why a delta committed as fused cannot be checked at all (None: it can be)."""
    if committer != block["fuser"]:
        return f"fusion: committed as fused by {committer[:16]}, not by the designated fuser {block['fuser'][:16]}"
    if record is None:
        return "fusion: no fusion record from the designated fuser"
    if record["delta_id"] != delta_id:
        return f"fusion: the fusion record names delta {record['delta_id'][:12]}, not this one"
    if sorted(record["packs"]) != block["packs"]["ids"] or record["probe_id"] != block["probe"]:
        return "fusion: the fusion record names other packs or another probe than the proposal"
    if record["replay_id"] != block.get("replay"):
        named = "no replay set" if record["replay_id"] is None else f"replay set {record['replay_id'][:12]}"
        wanted = "none" if block.get("replay") is None else block["replay"][:12]
        return f"fusion: the fusion record names {named}, not the proposal's ({wanted})"
    return None


def judge(block: dict, record: dict, measured_before: dict, measured_after: dict) -> str | None:
    """The fused delta's verdict from the figures every participant measured itself:
    None if it stays, else the reason it is excluded (the same at every honest node)."""
    tol = block["tolerance"]
    names = (*FIGURES, REPLAY_FIGURE) if block.get("replay") else FIGURES
    for which, reported, measured in (("base", record["before"], measured_before), ("fused model", record["after"], measured_after)):
        for name in names:
            if abs(reported[name] - measured[name]) > tol:
                return (f"fusion: reported {which} probe loss {name}={reported[name]:.6g} differs from the "
                        f"recomputed {measured[name]:.6g} (tolerance {tol:g})")
    lam = block["lambda"]
    before, after = probe_loss(measured_before, lam), probe_loss(measured_after, lam)
    if not after < before:
        return f"fusion: no improvement on the probe: probe loss {before:.6g} (base) -> {after:.6g} (fused)"
    if block.get("replay"):
        drift = replay_drift(measured_before, measured_after)
        if drift > block["max_drift"]:
            return (f"fusion: drift on the replay set {drift:.6g} exceeds max_drift {block['max_drift']:g} "
                    f"(replay loss {measured_before[REPLAY_FIGURE]:.6g} (base) -> {measured_after[REPLAY_FIGURE]:.6g} (fused))")
    return None


def replay_drift(before: dict, after: dict) -> float:
    """How much more the fused model is surprised by the base's own distribution on the replay set."""
    return after[REPLAY_FIGURE] - before[REPLAY_FIGURE]
