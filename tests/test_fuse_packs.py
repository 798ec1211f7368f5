"""Logit packs (what they hold, and that damage or a wrong probe is refused) and fusion of
a GPT-2 with a byte-level BPE tokenizer into a Llama pivot with a character tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from fuse_fixtures import shared_hetero

from hivemerge.merge.deltas.delta import DeltaFile, apply_delta
from hivemerge.merge.fusion.distill import DistillConfig, fuse_into_pivot, pivot_view, pivot_vocab
from hivemerge.merge.fusion.fuse import fuse_examples
from hivemerge.merge.fusion.packs import METADATA_KEY, PackFile, tokenize_pair
from hivemerge.merge.io.manifest import model_id
from hivemerge.merge.io.models import load_causal_lm
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.merge.toy import hetero
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.packs import PackError
from hivemerge.protocol.signing import sign_manifest


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return shared_hetero(tmp_path_factory)


def test_pack_holds_the_experts_top_k_log_probs(setup):
    pack = PackFile(setup.pack)
    pack.check_probe(setup.probe)
    model, tokenizer = load_causal_lm(setup.expert)
    examples = pack.load()
    lengths = pack.manifest["lengths"]
    assert len(examples) == len(setup.probe) == len(lengths) == 200
    for e in (0, 57, 199):
        prompt, response = setup.probe.pairs[e]
        ids, first = tokenize_pair(tokenizer, prompt, response)
        assert lengths[e] == len(ids) - first
        assert "".join(examples[e].targets) == response  # the expert's own cut of the reference response
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        row = sum(lengths[:e])
        stored = pack.tensors()
        for k in range(lengths[e]):
            top = logp[first - 1 + k].topk(8)
            assert stored["ids"][row + k].tolist() == top.indices.tolist()
            assert torch.allclose(stored["logprobs"][row + k].float(), top.values, atol=2e-3, rtol=1e-3)
            assert stored["target_logprobs"][row + k].float().item() == pytest.approx(logp[first - 1 + k, ids[first + k]].item(), abs=2e-3)
    summary = pack.summary()
    assert summary["probe_id"] == setup.probe.id and summary["signer"] == setup.alice.public_hex
    # top-8: 8 int16 ids + 8 fp16 log-probs + the target and its log-prob = 36 bytes, plus the header.
    assert 36 <= summary["bytes_per_token"] < 60, summary


def _refused(path) -> str:
    try:
        PackFile(path).load()
    except UserInputError as exc:
        return str(exc)
    raise AssertionError("accepted")


def test_every_flipped_byte_is_refused(setup, tmp_path):
    original = setup.small_pack.read_bytes()
    assert len(original) < 4000
    PackFile(setup.small_pack).load()
    path = tmp_path / "flipped.pack.safetensors"
    path.write_bytes(original)
    missed = []
    with path.open("r+b", buffering=0) as f:
        for i in range(len(original)):
            f.seek(i)
            f.write(bytes([original[i] ^ (1 << (i % 8))]))
            try:
                _refused(path)
            except AssertionError:
                missed.append((i, original[max(0, i - 20) : i + 20]))
            f.seek(i)
            f.write(original[i : i + 1])
    assert not missed, missed[:5]


def test_truncated_and_padded_packs_are_refused(setup, tmp_path):
    original = setup.small_pack.read_bytes()
    path = tmp_path / "cut.pack.safetensors"
    for cut in (0, 7, 100, len(original) // 2, len(original) - 1):
        path.write_bytes(original[:cut])
        _refused(path)
    path.write_bytes(original + b"\0")
    assert "truncated or padded" in _refused(path)


def test_a_pack_for_another_probe_set_is_refused(setup, tmp_path):
    pack = PackFile(setup.pack)
    assert setup.other_probe.id != setup.probe.id  # one response differs
    with pytest.raises(PackError, match="made for probe set"):
        pack.check_probe(setup.other_probe)
    with pytest.raises(PackError, match="made for probe set"):
        fuse_into_pivot(setup.pivot, [pack], setup.other_probe, tmp_path / "out", config=DistillConfig(steps=1))
    assert not (tmp_path / "out").exists()


def test_a_pack_re_signed_by_another_key_is_refused_when_the_signer_is_required(setup, tmp_path):
    """Mallory rewrites the manifest (claims another probe) and signs it with her own key:
    the signature verifies, but not as alice's."""
    from hivemerge.merge.io.sources import read_header

    header, start = read_header(setup.small_pack)
    signed = json.loads(header["__metadata__"][METADATA_KEY])
    forged = dict(signed["manifest"], probe=setup.probe.id)
    header["__metadata__"][METADATA_KEY] = json.dumps(sign_manifest(Identity.generate(), "pack", forged),
                                                      sort_keys=True, separators=(",", ":"))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "forged.pack.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + setup.small_pack.read_bytes()[start:])
    PackFile(path)  # a valid signature, by someone
    with pytest.raises(PackError, match="not by"):
        PackFile(path, expected_signer=setup.alice.fingerprint)
    # The same rewrite under alice's old signature does not verify at all.
    header["__metadata__"][METADATA_KEY] = json.dumps(dict(signed, manifest=forged), sort_keys=True, separators=(",", ":"))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + setup.small_pack.read_bytes()[start:])
    assert "signature does not verify" in _refused(path)


def test_mince_picks_the_trained_expert_over_an_untrained_one(setup):
    _, tokenizer = load_causal_lm(setup.pivot)
    encoded, texts = pivot_view(tokenizer, setup.probe)
    sources = [PackFile(setup.control_pack).load(), PackFile(setup.pack).load()]
    _, stats = fuse_examples(sources, texts, [ids[first:] for ids, first in encoded], pivot_vocab(tokenizer), "mince")
    # Three digits and a newline per example. A pivot character inside a BPE token is
    # uncovered only when no top-k candidate continues the characters already emitted.
    assert stats.tokens == 200 * 4 and stats.covered > 0.95 * stats.tokens, stats
    assert stats.picks[1] > 0.9 * stats.covered, stats


def test_fusion_lowers_the_pivots_loss_on_the_experts_domain(setup, tmp_path):
    """lambda = 0: the pivot learns only from the fused distributions, never from the reference
    tokens, so what it gains on held-out prompts came from the expert. An untrained expert of
    the same kind (the control) teaches it nothing of the kind."""
    config = DistillConfig(lam=0.0, steps=100, lr=3e-3, batch=32)
    report = fuse_into_pivot(setup.pivot, [PackFile(setup.pack)], setup.probe, tmp_path / "fused", "mince", config,
                             setup.alice, tmp_path / "fused.delta.safetensors")
    fuse_into_pivot(setup.pivot, [PackFile(setup.control_pack)], setup.probe, tmp_path / "control", "mince", config)

    def loss(directory):
        return hetero.response_loss(*load_causal_lm(directory), setup.held_out)

    expert, pivot, fused, control = loss(setup.expert), loss(setup.pivot), loss(tmp_path / "fused"), loss(tmp_path / "control")
    assert expert < 1.2 and pivot > 3.0, (expert, pivot)
    assert fused < 0.6 * pivot, (fused, pivot)
    assert fused < control - 1.0, (fused, control)
    assert report.after["fused"] < 0.7 * report.before["fused"]
    # The result is a signed delta against the pivot, which rebuilds the fused model.
    delta = DeltaFile(report.delta_path)
    assert delta.id == report.delta_id and delta.signer == setup.alice.public_hex
    assert delta.manifest["base"] == model_id(SafetensorsModel(setup.pivot))
    assert delta.manifest["expert"] == model_id(SafetensorsModel(tmp_path / "fused"))
    apply_delta(setup.pivot, report.delta_path, tmp_path / "rebuilt")
    assert loss(tmp_path / "rebuilt") == pytest.approx(fused, abs=0.05)
    saved = json.loads((tmp_path / "fused" / "fusion.json").read_text())
    assert saved["packs"] == [PackFile(setup.pack).id] and saved["probe_id"] == setup.probe.id
    # The fused model keeps the pivot's tokenizer byte for byte.
    assert (tmp_path / "fused" / "tokenizer.json").read_bytes() == (setup.pivot / "tokenizer.json").read_bytes()


def test_replay_keeps_the_pivot_where_it_should_not_move(setup, tmp_path):
    """With a replay set, the pivot is held to its own distribution there: it drifts far
    less than without."""
    from hivemerge.merge.fusion.probe import make_probe

    replay = make_probe([(f"max {a} {b}=", f"{max(a, b)}\n") for a, b in [(3, 7), (12, 5), (40, 41), (9, 90)] * 8])
    config = dict(lam=0.5, steps=40, lr=3e-3, batch=16)
    held = fuse_into_pivot(setup.pivot, [PackFile(setup.pack)], setup.probe, tmp_path / "held", config=DistillConfig(**config),
                           replay=replay)
    free = fuse_into_pivot(setup.pivot, [PackFile(setup.pack)], setup.probe, tmp_path / "free",
                           config=DistillConfig(**config, replay_share=0.0), replay=replay)
    drift = lambda r: r.after["replay"] - r.before["replay"]  # noqa: E731
    assert drift(held) < 0.5 * drift(free), (drift(held), drift(free))


def test_token_texts_longer_than_the_protocol_allows_are_refused(setup, tmp_path, monkeypatch):
    from hivemerge.merge.fusion import packs
    from hivemerge.merge.fusion.probe import make_probe

    small = make_probe(setup.probe.pairs[:4])
    # making: a tokenizer whose token texts are too long cannot be packed
    monkeypatch.setattr(packs, "token_text", lambda tokenizer, t: "7" * (packs.MAX_PIECE_CHARS + 1))
    with pytest.raises(PackError, match=f"longer than {packs.MAX_PIECE_CHARS} characters"):
        packs.make_pack(setup.expert, small, tmp_path / "long.pack.safetensors", setup.alice)
    assert not (tmp_path / "long.pack.safetensors").exists()
    monkeypatch.undo()
    # reading: a signed pack is refused when its longest token text passes the limit
    longest = max(len(text) for text in PackFile(setup.pack).pieces()[0].values())
    assert longest >= 2  # the BPE merged characters
    monkeypatch.setattr(packs, "MAX_PIECE_CHARS", longest - 1)
    assert f"longer than {longest - 1} characters" in _refused(setup.pack)
    monkeypatch.setattr(packs, "MAX_PIECE_CHARS", longest)
    assert len(PackFile(setup.pack).load()) == len(setup.probe)
