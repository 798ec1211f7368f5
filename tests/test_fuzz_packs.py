"""Fuzzing the logit-pack reader (issue 18): damaged bytes of a signed pack, and packs
re-signed by the attacker with a mutated manifest or mutated token texts. Opening and
verifying (the stream a fetched pack goes through, and :meth:`PackFile.load`) refuse with
a PackError or accept; nothing else escapes, and damaged bytes are never accepted.

Seeded: a failure names its seed and mutation, and reruns the same way.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from pack_fixtures import synthetic_pack, synthetic_tensors

from hivemerge.merge.fusion.packs import METADATA_KEY, PackFile, write_pack
from hivemerge.merge.io.sources import read_header
from hivemerge.protocol.content import canonical_json
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.signing import sign_manifest

MALLORY = Identity.generate()
TOKENS, VOCAB = 300, 50


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz-pack") / "good.pack.safetensors"
    synthetic_pack(path, TOKENS, MALLORY, vocab=VOCAB, per_example=100)
    return path


def opened(path) -> bool:
    """Whether the pack opens and verifies both ways; only a refusal may be raised."""
    try:
        pack = PackFile(path)
        pack.verify(block_bytes=256)
        pack.load()
        return True
    except UserInputError:
        return False


def resigned(good, tmp_path, name: str, change) -> object:
    """The good pack with its signed manifest changed by ``change`` and signed again by Mallory."""
    header, start = read_header(good)
    signed = json.loads(header["__metadata__"][METADATA_KEY])
    manifest = change(json.loads(json.dumps(signed["manifest"])))
    header["__metadata__"][METADATA_KEY] = json.dumps(sign_manifest(MALLORY, "pack", manifest), sort_keys=True,
                                                      separators=(",", ":"))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / name
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + good.read_bytes()[start:])
    return path


HOSTILE = [None, True, -1, 0, 2**63, 1e300, "", "x", "../x", [], {}, [0], [[]], {"a": 1}, "ab" * 32, [10**6], [-5], "F16", "I64"]


def test_the_good_pack_opens(pack):
    assert opened(pack)


def test_damaged_bytes_are_always_refused(pack, tmp_path):
    rng = random.Random(6)
    good = pack.read_bytes()
    target = tmp_path / "damaged.pack.safetensors"
    for i in range(600):
        data = bytearray(good)
        damage = rng.choice(["flip", "flip", "cut", "insert"])
        if damage == "flip":
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif damage == "cut":
            del data[rng.randrange(len(data)):]
        else:
            at = rng.randrange(len(data))
            data[at:at] = rng.choice([b"\x00", b"[[[[", b"NaN", bytes(8)])
        if bytes(data) == good:
            continue
        target.write_bytes(bytes(data))
        assert not opened(target), f"seed 6, damage {i} ({damage}) was accepted"


def test_re_signed_manifest_mutations_are_refused_or_consistent(pack, tmp_path):
    rng = random.Random(66)
    keys = ["probe", "model", "tokenizer", "top_k", "lengths", "tensors", "files", "kind", "version"]
    accepted = 0
    for i in range(400):
        key = rng.choice(keys)
        value = rng.choice(HOSTILE)

        def change(manifest, key=key, value=value):
            if rng.random() < 0.3 and isinstance(manifest.get("tensors"), dict):
                name = rng.choice(sorted(manifest["tensors"]))
                field = rng.choice(["dtype", "shape", "sha256", "extra"])
                manifest["tensors"][name][field] = value
            else:
                manifest[key] = value
            return manifest

        accepted += opened(resigned(pack, tmp_path, f"m{i}.pack.safetensors", change))
    assert accepted < 40  # a changed manifest rarely still describes the same bytes (an id claim, say)


@pytest.mark.parametrize("pieces", [
    {"pieces": {str(2**70): "x"}, "special": []},  # an id past int64
    {"pieces": {"-1": "x"}, "special": []},
    {"pieces": {"1e3": "x"}, "special": []},
    {"pieces": {"9" * 5000: "x"}, "special": []},  # past Python's digit limit for int()
    {"pieces": {"1": ["a"]}, "special": [2**70]},
    {"pieces": [], "special": []},
    {"pieces": {"1": "x"}, "special": "1"},
    {"pieces": {}, "special": [], "extra": {"a": [[[[[]]]]]}},
])
def test_re_signed_token_texts_are_refused_or_accepted_never_raise(tmp_path, pieces):
    tensors = synthetic_tensors(40, vocab=4)
    path = tmp_path / "texts.pack.safetensors"
    try:
        write_pack(path, tensors, canonical_json(pieces), "ab" * 32, "cd" * 32, "ef" * 32, 8, [40], MALLORY)
    except UserInputError:
        return  # refused already when written
    assert opened(path) is False  # no text for ids 0..3 in any of these


def test_an_id_past_int64_in_the_texts_does_not_break_the_stream(tmp_path):
    tensors = synthetic_tensors(40, vocab=4)
    texts = {"pieces": {**{str(t): f"t{t}" for t in range(4)}, str(2**70): "huge"}, "special": []}
    path = tmp_path / "huge.pack.safetensors"
    write_pack(path, tensors, canonical_json(texts), "ab" * 32, "cd" * 32, "ef" * 32, 8, [40], MALLORY)
    assert opened(path) is False  # refused as a pack error: no token id lies outside [0, 2**31)
    assert torch.equal(PackFile(path).tensors()["ids"], tensors["ids"])
