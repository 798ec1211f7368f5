"""A tiny heterogeneous setup, made once per session (about ten seconds on one thread):

- ``expert``: a GPT-2 (transformers GPT2LMHeadModel) with a byte-level BPE tokenizer
  trained here, trained on 3-digit ``rotate`` (``arm 482=`` -> ``824``);
- ``control``: the same architecture and tokenizer, untrained;
- ``pivot``: a Llama with the character tokenizer of the demo, untrained;
- a probe set of 200 training-split examples, a held-out suite, and packs of both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from hivemerge.merge.fusion.packs import make_pack
from hivemerge.merge.fusion.probe import ProbeSet, write_probe
from hivemerge.merge.toy import hetero, tasks, training
from hivemerge.merge.toy.training import build_tokenizer, new_model, save
from hivemerge.protocol.identity import Identity


@dataclass
class Hetero:
    root: Path
    expert: Path
    control: Path
    pivot: Path
    probe: ProbeSet
    other_probe: ProbeSet
    held_out: list[tasks.Example]
    alice: Identity
    pack: Path
    control_pack: Path
    small_pack: Path  # 4 examples, for byte-by-byte damage tests
    small_probe: ProbeSet


_SHARED: Hetero | None = None


def rotate3(rng: random.Random) -> tasks.Example:
    return hetero.rotate_task(rng, 3, 3)


def shared_hetero(tmp_path_factory) -> Hetero:
    global _SHARED
    if _SHARED is None:
        _SHARED = _build(tmp_path_factory.mktemp("hetero"))
    return _SHARED


def _build(root: Path) -> Hetero:
    draw = tasks.training_only(rotate3)
    rng = random.Random(0)
    train = [draw(rng) for _ in range(300)]
    tokenizer = hetero.build_bpe_tokenizer([e.text for e in train] + list(tasks.ALPHABET), 300)
    expert = hetero.new_gpt2(len(tokenizer), 0, hidden=64, layers=2)
    training.train(expert, tokenizer, draw, 200, seed=1, lr=3e-3, batch=32, encoder=hetero.encode_pairs)
    save(expert, tokenizer, root / "expert")
    save(hetero.new_gpt2(len(tokenizer), 5, hidden=64, layers=2), tokenizer, root / "control")
    char = build_tokenizer()
    save(new_model(len(char), 0, hidden=32, layers=2), char, root / "pivot")

    pairs = [(e.prompt, e.answer + "\n") for e in train[:200]]
    probe = write_probe(pairs, root / "probe.jsonl")
    other = write_probe(pairs[:199] + [(pairs[199][0], "000\n")], root / "other.jsonl")  # one response differs
    small = write_probe(pairs[:4], root / "small.jsonl")
    rng = random.Random(9)
    held: list[tasks.Example] = []
    while len(held) < 50:
        e = rotate3(rng)
        if tasks.is_held_out(e.prompt) and e not in held:
            held.append(e)
    alice = Identity.generate()
    make_pack(root / "expert", probe, root / "expert.pack.safetensors", alice, top_k=8)
    make_pack(root / "control", probe, root / "control.pack.safetensors", alice, top_k=8)
    make_pack(root / "expert", small, root / "small.pack.safetensors", alice, top_k=2)
    return Hetero(root, root / "expert", root / "control", root / "pivot", probe, other, held, alice,
                  root / "expert.pack.safetensors", root / "control.pack.safetensors", root / "small.pack.safetensors", small)
