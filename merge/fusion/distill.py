"""Distilling fused distributions into the pivot, and writing the result as a signed delta.

On the probe's response tokens (the pivot's own tokenization) the loss is

    lambda * CE(pivot, reference token) + (1 - lambda) * CE(pivot, fused distribution)

where a token that no source covers uses the reference token for both terms.
Optionally a replay set (prompts and responses of the pivot's own domains) is mixed
into every batch with a pure self-distillation loss: CE to the original pivot's own
distribution there. It carries no labels, only "stay as you were", which keeps the
skills a narrow probe set would otherwise wash out (FuseLLM gets the same from
distilling on a broad corpus). The trained pivot is written as a model directory with the pivot's tokenizer files byte
for byte, and (with an identity) as a signed delta against the pivot, so it joins a
weight merge like any homogeneous expert.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hivemerge.merge.deltas.delta import extract_delta
from hivemerge.merge.fusion.align import VocabMap
from hivemerge.merge.fusion.fuse import Dist, fuse_examples
from hivemerge.merge.fusion.packs import PackFile
from hivemerge.merge.fusion.probe import ProbeSet
from hivemerge.merge.io.atomic import atomic_directory
from hivemerge.merge.io.manifest import TOKENIZER_FILES
from hivemerge.merge.io.models import load_causal_lm
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.merge.io.tokens import pad_id, right_padded, token_text, tokenize_pair
from hivemerge.merge.numerics.threads import single_thread
from hivemerge.protocol.fusion import DISTILLATION
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity

Progress = Callable[[str, int, int], None]  # (stage, done, total)
DEFAULT_DELTA_CODEC = "int8"  # a distilled delta is dense and small in norm: int8 keeps it near exact


@dataclass
class DistillConfig:
    """Distillation settings; the defaults are the protocol's (protocol/fusion.py, DISTILLATION)."""

    lam: float = DISTILLATION["lambda"]
    steps: int = DISTILLATION["steps"]
    lr: float = DISTILLATION["lr"]
    batch: int = DISTILLATION["batch"]
    seed: int = DISTILLATION["seed"]
    replay_share: float = DISTILLATION["replay_share"]  # of each batch, when a replay set is given
    replay_top_k: int = 16  # the original pivot's distribution is kept as its top-k, renormalised

    def check(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise UserInputError(f"--lambda must be in [0, 1], got {self.lam}")
        if self.steps < 0 or self.batch < 1 or not self.lr > 0:
            raise UserInputError("--steps must be >= 0, --batch >= 1 and --lr > 0")
        if not 0.0 <= self.replay_share < 1.0 or self.replay_top_k < 1:
            raise UserInputError("--replay-share must be in [0, 1) and the replay top-k >= 1")


@dataclass
class PivotExample:
    ids: list[int]  # [bos] + prompt + response, pivot tokenization
    first: int  # index of the first response token
    support: torch.Tensor  # [response tokens, S] pivot ids of the target distribution
    probs: torch.Tensor  # [response tokens, S] their probabilities (0 pads)
    lam: float  # weight of the reference-token loss (0: pure distillation)

    @property
    def gold(self) -> list[int]:
        return self.ids[self.first:]


def pivot_view(tokenizer, probe: ProbeSet) -> tuple[list[tuple[list[int], int]], list[list[str]]]:
    """Pivot token ids of every probe example, and the text of each response token."""
    encoded = [tokenize_pair(tokenizer, p, r) for p, r in probe.pairs]
    texts = [[token_text(tokenizer, t) for t in ids[first:]] for ids, first in encoded]
    return encoded, texts


def pivot_vocab(tokenizer) -> VocabMap:
    special = set(tokenizer.all_special_ids)
    return VocabMap({i: token_text(tokenizer, i) for i in range(len(tokenizer)) if i not in special})


def targets(encoded: list[tuple[list[int], int]], fused: list[list[Dist | None]], lam: float) -> list[PivotExample]:
    width = max([1] + [len(d) for row in fused for d in row if d])
    examples = []
    for (ids, first), row in zip(encoded, fused):
        support = torch.zeros((len(row), width), dtype=torch.long)
        probs = torch.zeros((len(row), width))
        for k, (gold, dist) in enumerate(zip(ids[first:], row)):
            items = sorted(dist.items()) if dist else [(gold, 1.0)]
            support[k, : len(items)] = torch.tensor([t for t, _ in items])
            probs[k, : len(items)] = torch.tensor([p for _, p in items])
        examples.append(PivotExample(ids, first, support, probs, lam))
    return examples


@torch.no_grad()
def self_targets(model, encoded: list[tuple[list[int], int]], pad: int, top_k: int, batch: int = 128) -> list[PivotExample]:
    """Replay examples whose targets are the model's own (top-k, renormalised) distributions."""
    examples = []
    with single_thread():
        for i in range(0, len(encoded), batch):
            part = encoded[i : i + batch]
            ids, mask = right_padded([e[0] for e in part], pad)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            for row, (seq, first) in enumerate(part):
                top = torch.softmax(logits[row, first - 1 : len(seq) - 1], -1).topk(min(top_k, logits.shape[-1]), -1)
                examples.append(PivotExample(seq, first, top.indices, top.values / top.values.sum(-1, keepdim=True), 0.0))
    return examples


def _batch_losses(model, batch: list[PivotExample], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = right_padded([e.ids for e in batch], pad)
    logits = model(input_ids=ids, attention_mask=mask).logits
    rows = torch.cat([torch.full((len(e.gold),), i) for i, e in enumerate(batch)])
    positions = torch.cat([torch.arange(e.first - 1, len(e.ids) - 1) for e in batch])
    logp = torch.log_softmax(logits[rows, positions].float(), dim=-1)
    gold = torch.cat([torch.tensor(e.gold) for e in batch])
    lm = -logp.gather(1, gold[:, None])[:, 0]
    width = max(e.support.shape[1] for e in batch)
    support = torch.cat([torch.nn.functional.pad(e.support, (0, width - e.support.shape[1])) for e in batch])
    probs = torch.cat([torch.nn.functional.pad(e.probs, (0, width - e.probs.shape[1])) for e in batch])
    fused = -(probs * logp.gather(1, support)).sum(-1)
    lam = torch.cat([torch.full((len(e.gold),), e.lam) for e in batch])
    return lm, fused, lam


@torch.no_grad()
def probe_losses(model, examples: list[PivotExample], pad: int, batch: int = 128) -> dict[str, float]:
    """Mean per-token CE on the probe: against the reference tokens, and against the fused targets."""
    lm_sum = fused_sum = 0.0
    count = 0
    with single_thread():
        for i in range(0, len(examples), batch):
            lm, fused, _ = _batch_losses(model, examples[i : i + batch], pad)
            lm_sum, fused_sum, count = lm_sum + lm.sum().item(), fused_sum + fused.sum().item(), count + len(lm)
    return {"lm": lm_sum / count, "fused": fused_sum / count}


def distill(model, examples: list[PivotExample], config: DistillConfig, pad: int, replay: list[PivotExample] | None = None,
            progress: Callable[[int, int, float], None] | None = None) -> None:
    """AdamW with warmup and cosine decay over shuffled passes of the probe (and the replay
    set, ``replay_share`` of every batch); deterministic for a seed."""
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    opt, sched = optimizer(model, config.steps, config.lr)
    # At least one probe example per batch: round() could give the whole batch to the replay set.
    n_replay = min(round(config.batch * config.replay_share), config.batch - 1) if replay else 0
    pools = [(examples, config.batch - n_replay)]
    if replay:
        pools.append((replay, n_replay))
    orders: list[list[int]] = [[] for _ in pools]
    model.train()
    with single_thread():
        for step in range(config.steps):
            batch = []
            for (pool, count), order in zip(pools, orders):
                while len(order) < count:  # shuffled passes over each pool
                    fresh = list(range(len(pool)))
                    rng.shuffle(fresh)
                    order += fresh
                batch += [pool[i] for i in order[:count]]
                del order[:count]
            lm, fused, lam = _batch_losses(model, batch, pad)
            loss = (lam * lm + (1 - lam) * fused).mean()
            optimizer_step(model, opt, sched, loss)
            if progress:
                progress(step + 1, config.steps, loss.item())
    model.eval()


@dataclass
class FuseReport:
    out_dir: Path
    probe_id: str
    packs: list[str]
    method: str
    config: dict
    coverage: dict
    before: dict[str, float]
    after: dict[str, float]
    seconds: float
    delta_path: Path | None = None
    delta_id: str | None = None
    replay_id: str | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"], d["delta_path"] = str(self.out_dir), str(self.delta_path) if self.delta_path else None
        return d


def fuse_into_pivot(pivot_dir: str | Path, packs: list[PackFile], probe: ProbeSet, out_dir: str | Path,
                    method: str = "mince", config: DistillConfig | None = None, identity: Identity | None = None,
                    delta_out: str | Path | None = None, codec: str = DEFAULT_DELTA_CODEC, overwrite: bool = False,
                    replay: ProbeSet | None = None, progress: Progress | None = None,
                    delta_base: str | Path | None = None) -> FuseReport:
    """Align and fuse ``packs`` on ``probe``, distil into the pivot (keeping it as it was on
    ``replay``), write ``out_dir`` (and, with ``delta_out``, a signed delta against the pivot,
    or against ``delta_base``: a round's base when the pivot is its weight merge)."""
    started = time.perf_counter()
    config = config or DistillConfig()
    config.check()
    if not packs:
        raise UserInputError("give at least one pack")
    if delta_out is not None and identity is None:
        raise UserInputError("writing a delta needs an identity to sign it")
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:  # say so before minutes of training
        raise UserInputError(f"{out_dir}: directory exists and is not empty (pass --overwrite to replace it)")
    for pack in packs:
        pack.check_probe(probe)
    sources = [pack.load() for pack in packs]  # every hash checked before any value is used
    pivot_dir = Path(pivot_dir)
    model, tokenizer = load_causal_lm(pivot_dir)
    pad = pad_id(tokenizer)
    encoded, texts = pivot_view(tokenizer, probe)
    fused, stats = fuse_examples(sources, texts, [ids[first:] for ids, first in encoded], pivot_vocab(tokenizer), method)
    examples = targets(encoded, fused, config.lam)
    replayed = self_targets(model, pivot_view(tokenizer, replay)[0], pad, config.replay_top_k) if replay else None
    before = probe_losses(model, examples, pad)
    if replayed:
        before["replay"] = probe_losses(model, replayed, pad)["fused"]
    distill(model, examples, config, pad, replayed,
            progress=(lambda done, total, loss: progress("distilling", done, total)) if progress else None)
    after = probe_losses(model, examples, pad)
    if replayed:  # CE to the original pivot's own distribution: how far it moved where it should not
        after["replay"] = probe_losses(model, replayed, pad)["fused"]

    report = FuseReport(out_dir, probe.id, [p.id for p in packs], method, asdict(config), stats.as_dict(), before, after, 0.0,
                        replay_id=replay.id if replay else None)
    dtype = next(iter(SafetensorsModel(pivot_dir).tensors.values())).dtype
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        model.to(dtype).save_pretrained(staging)
        for name in TOKENIZER_FILES:  # the pivot's tokenizer, byte for byte
            if (pivot_dir / name).is_file():
                shutil.copyfile(pivot_dir / name, staging / name)
        report.seconds = time.perf_counter() - started
        (staging / "fusion.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    if delta_out is not None:
        delta = extract_delta(Path(delta_base) if delta_base is not None else pivot_dir, out_dir, delta_out, identity, codec)
        report.delta_path, report.delta_id = delta.path, delta.delta_id
        report.seconds = time.perf_counter() - started
        (out_dir / "fusion.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report


# -- the training step distillation uses (and the demo's toy training too) ----------------

def optimizer(model, steps: int, lr: float):
    """(optimizer, scheduler) of every training loop here: AdamW without weight decay,
    linear warmup over the first 5% of ``steps``, cosine decay to zero."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup, total = max(1, steps // 20), max(1, steps)
    # The cosine goes through a float32 tensor, not math.cos: the demo experts were trained
    # so, and their bytes (the demo cache, the tests' expected figures) depend on it.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / total)).item())
    )
    return opt, sched


def optimizer_step(model, opt, sched, loss: torch.Tensor) -> None:
    """One step: gradients of ``loss``, clipped to norm 1, then the optimizer and the schedule."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
