"""Logit packs from the network (issue 18, finding 6): a pack over MAX_PACK_BYTES is
refused before it is read, and a fetched pack is verified as a stream, in memory bounded
by a block and its token texts, not by building Python objects for every token."""

from __future__ import annotations

import tracemalloc

import pytest
from pack_fixtures import PACK_BYTES_PER_TOKEN, synthetic_pack, synthetic_tensors

from hivemerge.merge.fusion import packs
from hivemerge.merge.fusion.packs import PackFile
from hivemerge.node.net.transfer import size_limit
from hivemerge.node.storage.store import PACK_SUFFIX, ContentStore, verify_file_object
from hivemerge.protocol.bundles import MAX_OBJECT_BYTES
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.packs import MAX_PACK_BYTES, PackError

MIB = 1 << 20


@pytest.fixture(scope="module")
def alice():
    return Identity.generate()


def test_a_pack_over_the_size_cap_is_refused_before_it_is_read(tmp_path, alice, monkeypatch):
    path = tmp_path / "big.pack.safetensors"
    synthetic_pack(path, 2 * MIB // PACK_BYTES_PER_TOKEN, alice)  # ~2 MiB, signed and intact
    size = path.stat().st_size
    assert 2 * MIB - 4096 < size < 2 * MIB + 65536
    PackFile(path).verify()  # a valid pack under the real cap
    monkeypatch.setattr(packs, "MAX_PACK_BYTES", MIB)  # the cap, scaled down to 1 MiB for the test
    with pytest.raises(PackError, match=f"{size} bytes, more than the {MIB} a pack may be"):
        PackFile(path)
    with pytest.raises(PackError, match="more than the"):
        verify_file_object(path, PACK_SUFFIX)  # how a fetched pack is checked
    store = ContentStore(tmp_path / "home")
    with pytest.raises(PackError, match="more than the"):
        store.add_pack(path)
    assert not store.objects.exists() or not any(store.objects.iterdir())
    with pytest.raises(PackError, match="larger than the 1 MiB a pack may be"):  # nor is one made
        synthetic_pack(tmp_path / "made.pack.safetensors", 2 * MIB // PACK_BYTES_PER_TOKEN, alice)
    assert not (tmp_path / "made.pack.safetensors").exists()


def test_probe_sets_are_capped_and_deep_lines_refused(tmp_path, monkeypatch):
    from hivemerge.merge.fusion import probe as probe_module
    from hivemerge.merge.fusion.probe import load_probe
    from hivemerge.protocol.packs import MAX_PROBE_BYTES, PackError

    deep = tmp_path / "deep.probe.jsonl"
    deep.write_text("[" * 100_000 + "\n")  # nesting past the parser's stack: a PackError, not a RecursionError
    with pytest.raises(PackError, match="expected a JSON object"):
        load_probe(deep)
    big = tmp_path / "big.probe.jsonl"
    big.write_text('{"prompt": "a", "response": "b"}\n' * 100)
    monkeypatch.setattr(probe_module, "MAX_PROBE_BYTES", 1000)
    with pytest.raises(PackError, match="more than the 1000"):
        load_probe(big)
    probe = "34" * 32
    bundle = {"content": probe, "files": [{"path": f"{probe}.probe.jsonl", "size": 10 * MAX_PROBE_BYTES}]}
    assert size_limit(bundle, None) == MAX_PROBE_BYTES


def test_a_fetch_of_a_pack_is_bounded_by_the_pack_cap():
    pack = "12" * 32
    bundle = {"content": pack, "files": [{"path": f"{pack}{PACK_SUFFIX}", "size": 10 * MAX_PACK_BYTES}]}
    assert size_limit(bundle, None) == MAX_PACK_BYTES
    assert size_limit(bundle, 5000) == 5000  # the signed record's size, when the caller knows it
    delta = {"content": pack, "files": [{"path": f"{pack}.delta.safetensors", "size": 1}]}
    assert size_limit(delta, None) == MAX_OBJECT_BYTES


def test_a_pack_is_verified_as_a_stream(tmp_path, alice):
    path = tmp_path / "p.pack.safetensors"
    tokens = 16 * MIB // PACK_BYTES_PER_TOKEN  # 466,033 response tokens, 16 MiB
    pack_id = synthetic_pack(path, tokens, alice)
    assert path.stat().st_size > 16 * MIB
    tracemalloc.start()
    try:
        assert verify_file_object(path, PACK_SUFFIX) == pack_id
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Blocks of 1 MiB and 2000 token texts. Building Python objects for every token
    # (PackFile.load) peaks at hundreds of MiB here.
    assert peak < 4 * MIB, peak


@pytest.mark.parametrize("damage, message", [
    ("nan", "log-probs have NaN values"),
    ("positive", "log-probs above 0"),
    ("no-text", r"token ids \[1999\] have no text"),
    ("no-target-text", r"token ids \[1999\] have no text"),
])
def test_streamed_verification_refuses_what_loading_refuses(tmp_path, alice, damage, message):
    """Correctly signed packs (the test's own key) whose values are wrong: refused by
    both the streamed check and the loader."""
    tokens = 3000
    tensors = synthetic_tensors(tokens, vocab=1999)
    pieces = {t: f"t{t}" for t in range(1999)}
    if damage == "nan":
        tensors["logprobs"][2500, 3] = float("nan")
    elif damage == "positive":
        tensors["logprobs"][2999, 7] = 0.5
    elif damage == "no-text":
        tensors["ids"][1234, 0] = 1999
    else:
        tensors["targets"][17] = 1999
    path = tmp_path / "bad.pack.safetensors"
    synthetic_pack(path, tokens, alice, tensors=tensors, pieces=pieces)
    with pytest.raises(PackError, match=message):
        PackFile(path).verify(block_bytes=4096)  # many blocks: the damage is in a later one
    with pytest.raises(PackError, match=message):
        PackFile(path).load()


def test_a_flipped_data_byte_fails_the_streamed_hash_check(tmp_path, alice):
    path = tmp_path / "p.pack.safetensors"
    synthetic_pack(path, 3000, alice)
    raw = bytearray(path.read_bytes())
    raw[-5000] ^= 0x01  # in the data section, not in the header
    path.write_bytes(bytes(raw))
    with pytest.raises(PackError, match="fails its hash check"):
        PackFile(path).verify(block_bytes=4096)


def test_pieces_over_their_cap_are_refused(tmp_path, alice, monkeypatch):
    path = tmp_path / "p.pack.safetensors"
    synthetic_pack(path, 100, alice)
    monkeypatch.setattr(packs, "MAX_PIECES_BYTES", 1000)
    with pytest.raises(PackError, match="pieces.json is larger than 1000 bytes"):
        PackFile(path).verify()
