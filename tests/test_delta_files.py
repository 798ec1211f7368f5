"""Delta files through the Python API: what they hold, and that any damage is caught.

Every byte of two small delta files is flipped (all eight bits, and one bit) and every
truncation is tried: opening and verifying must raise a UserInputError each time.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from delta_fixtures import read_container, resign, rewrite_signed, tiny_pair, write_container

from hivemerge.merge.deltas.delta import METADATA_KEY, DeltaError, DeltaFile, DeltaSource, apply_delta, check_base, extract_delta
from hivemerge.merge.io.manifest import model_id
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.signing import sign_manifest


@pytest.fixture(scope="module")
def tiny_deltas(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-deltas")
    base, expert = tiny_pair(root)
    alice = Identity.generate()
    paths = {}
    for codec in ("lossless", "sparse:density=0.5,values=int8,block=8"):
        path = root / f"{codec.split(':')[0]}.delta.safetensors"
        extract_delta(base, expert, path, alice, codec)
        paths[codec] = path
    return base, expert, paths


def _fails_cleanly(path) -> str:
    try:
        DeltaFile(path).verify_all()
    except UserInputError as exc:
        return str(exc)
    raise AssertionError("accepted")


@pytest.mark.parametrize("codec", ["lossless", "sparse:density=0.5,values=int8,block=8"])
def test_every_flipped_byte_is_caught(tiny_deltas, tmp_path, codec):
    """Every position of the file, flipped two ways: all eight bits, and one bit."""
    _, _, paths = tiny_deltas
    original = paths[codec].read_bytes()
    assert 1500 < len(original) < 4000
    DeltaFile(paths[codec]).verify_all()  # the intact file is fine
    path = tmp_path / "flipped.delta.safetensors"
    path.write_bytes(original)
    missed = []
    with path.open("r+b", buffering=0) as f:
        for i in range(len(original)):
            for flip in (0xFF, 1 << (i % 8)):
                f.seek(i)
                f.write(bytes([original[i] ^ flip]))
                try:
                    _fails_cleanly(path)
                except AssertionError:
                    missed.append((i, flip, original[max(0, i - 20) : i + 20]))
            f.seek(i)
            f.write(original[i : i + 1])
    assert not missed, missed[:5]


def test_truncations_and_padding_are_caught(tiny_deltas, tmp_path):
    _, _, paths = tiny_deltas
    original = paths["lossless"].read_bytes()
    data_start = 8 + int.from_bytes(original[:8], "little")
    cuts = set(range(0, 16)) | set(range(16, len(original), 11)) | {data_start - 1, data_start, data_start + 1, len(original) - 1}
    path = tmp_path / "cut.delta.safetensors"
    for cut in sorted(cuts):
        path.write_bytes(original[:cut])
        message = _fails_cleanly(path)
        if cut >= data_start:
            assert f"truncated or padded ({cut} bytes, expected {len(original)})" in message
    for extra in (b"\x00", b" " * 8, original[-16:]):
        path.write_bytes(original + extra)
        assert "truncated or padded" in _fails_cleanly(path)


def test_a_delta_holds_what_its_manifest_says(family, tmp_path):
    path = tmp_path / "d.delta.safetensors"
    report = extract_delta(family.base, family.expert, path, family.alice, "lossless")
    delta = DeltaFile(path)
    base, expert = SafetensorsModel(family.base), SafetensorsModel(family.expert)
    assert delta.id == report.delta_id
    assert delta.manifest["base"] == model_id(base) == report.base_id
    assert delta.manifest["expert"] == model_id(expert) == report.expert_id
    assert delta.signer == family.alice.public_hex
    header, data = read_container(path)
    meta = header.pop("__metadata__")
    assert set(meta) == {"format", METADATA_KEY}
    # Every stored part is listed with the SHA-256 of its bytes.
    listed = {}
    for name, entry in delta.manifest["tensors"].items():
        assert entry["codec"] == "lossless" and entry["dtype"] == "F32"
        assert entry["shape"] == list(base.tensors[name].shape)
        for part, info in entry["parts"].items():
            listed[f"{name}::{part}"] = info["sha256"]
    for fname, sha in delta.manifest["files"].items():
        listed[f"__files__/{fname}"] = sha
    assert set(header) == set(listed)
    for key, entry in header.items():
        begin, end = entry["data_offsets"]
        assert hashlib.sha256(data[begin:end]).hexdigest() == listed[key]
    assert delta.files() == {f: (family.expert / f).read_bytes() for f in ("config.json", "tokenizer_config.json")}
    source = DeltaSource(delta, base)
    for name in expert.names():
        assert torch.equal(source.get(name), expert.get(name))


def test_signature_checks_when_opening(family, tmp_path):
    path = tmp_path / "d.delta.safetensors"
    extract_delta(family.base, family.expert, path, family.alice, "int8")
    DeltaFile(path, expected_signer=family.alice.fingerprint)
    DeltaFile(path, expected_signer=family.alice.public_hex)
    with pytest.raises(DeltaError, match=f"signed by {family.alice.fingerprint}, not by {family.bob.fingerprint}"):
        DeltaFile(path, expected_signer=family.bob.fingerprint)

    forged = rewrite_signed(path, tmp_path / "forged.delta.safetensors", lambda s: resign(s, family.bob, keep_signer=True))
    with pytest.raises(DeltaError, match="signature does not verify"):
        DeltaFile(forged)
    swapped = rewrite_signed(path, tmp_path / "swapped.delta.safetensors", lambda s: {**s, "signer": family.bob.public_hex})
    with pytest.raises(DeltaError, match="signature does not verify"):
        DeltaFile(swapped)
    # A delta re-signed by someone else verifies, names them, and keeps its id: who
    # signed is not part of what it is; --signer is how a user insists on a publisher.
    resigned = rewrite_signed(path, tmp_path / "resigned.delta.safetensors", lambda s: resign(s, family.bob))
    other = DeltaFile(resigned)
    assert other.signer == family.bob.public_hex and other.id == DeltaFile(path).id
    with pytest.raises(DeltaError, match="not by"):
        DeltaFile(resigned, expected_signer=family.alice.fingerprint)
    # The signed manifest stored as a JSON object instead of a string: refused, not a TypeError.
    header, data = read_container(path)
    header["__metadata__"][METADATA_KEY] = json.loads(header["__metadata__"][METADATA_KEY])
    with pytest.raises(DeltaError, match="not valid JSON"):
        DeltaFile(write_container(tmp_path / "object.delta.safetensors", header, data))


def _forge(path, dst, identity, change_manifest=None, change_header=None):
    """A file validly signed by ``identity`` after changing its manifest and/or header."""
    header, data = read_container(path)
    signed = json.loads(header["__metadata__"][METADATA_KEY])
    manifest = signed["manifest"]
    if change_manifest:
        change_manifest(manifest)
    header["__metadata__"][METADATA_KEY] = json.dumps(sign_manifest(identity, "delta", manifest), sort_keys=True, separators=(",", ":"))
    if change_header:
        change_header(header)
    return write_container(dst, header, data)


def test_validly_signed_but_malformed_deltas_are_refused(family, tmp_path):
    """A publisher can sign anything: the manifest and the layout are checked anyway."""
    path = tmp_path / "d.delta.safetensors"
    extract_delta(family.base, family.expert, path, family.alice, "int8")
    name = "model.layers.0.self_attn.q_proj.weight"
    cases = {
        "unknown codec 'zip'": lambda m: m["tensors"][name].update(codec="zip"),
        "codec.block: must be in [8": lambda m: m["tensors"][name].update(params={"block": 2}),
        "unknown options ['x']": lambda m: m["tensors"][name].update(params={"block": 64, "x": 1}),
        "unknown dtype 'F8'": lambda m: m["tensors"][name].update(dtype="F8"),
        "base is not a content id": lambda m: m.update(base="not-an-id"),
        "has a bad shape": lambda m: m["tensors"][name].update(shape=[16, -16]),
        "unsupported version 2": lambda m: m.update(version=2),
    }
    for fragment, change in cases.items():
        forged = _forge(path, tmp_path / "forged.delta.safetensors", family.alice, change_manifest=change)
        with pytest.raises(UserInputError) as info:
            DeltaFile(forged).verify_all()
        assert fragment in str(info.value), (fragment, str(info.value))

    def drop_part(m):
        del m["tensors"][name]["parts"]["scale"]

    forged = _forge(path, tmp_path / "forged.delta.safetensors", family.alice, change_manifest=drop_part)
    with pytest.raises(DeltaError, match=r"extra \['model.layers.0.self_attn.q_proj.weight::scale'\]"):
        DeltaFile(forged)

    def wrong_hash(m):
        m["tensors"][name]["parts"]["q"]["sha256"] = "0" * 64

    forged = _forge(path, tmp_path / "forged.delta.safetensors", family.alice, change_manifest=wrong_hash)
    delta = DeltaFile(forged)  # the layout is fine; the data is not what was signed
    with pytest.raises(DeltaError, match="q fails its hash check"):
        delta.verify_all()

    def overlap(header):
        key = f"{name}::scale"
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [begin - 4, end - 4]

    forged = _forge(path, tmp_path / "forged.delta.safetensors", family.alice, change_header=overlap)
    with pytest.raises(DeltaError, match="gaps or overlaps"):
        DeltaFile(forged)

    def extra_metadata(header):
        header["__metadata__"]["note"] = "hello"

    forged = _forge(path, tmp_path / "forged.delta.safetensors", family.alice, change_header=extra_metadata)
    with pytest.raises(DeltaError):
        DeltaFile(forged)


def test_check_base(family, tmp_path):
    path = tmp_path / "d.delta.safetensors"
    extract_delta(family.base, family.expert, path, family.alice, "sign1")
    delta = DeltaFile(path)
    check_base(delta, SafetensorsModel(family.base))
    wrong_id = model_id(SafetensorsModel(family.wrong_base))
    for other, fragment in [
        (family.wrong_base, f"made against base {delta.manifest['base'][:12]}, but {family.wrong_base} is {wrong_id[:12]}"),
        (family.base_fp16, "made against base"),
        (family.other_arch, "architecture differs"),
    ]:
        with pytest.raises(DeltaError) as info:
            check_base(delta, SafetensorsModel(other))
        assert fragment in str(info.value)
    with pytest.raises(DeltaError, match="has shape"):
        delta.decode("model.layers.0.self_attn.q_proj.weight", torch.zeros(8, 8))


@pytest.mark.parametrize("which", ["nan_expert", "inf_expert"])
def test_extract_refuses_non_finite_experts_and_writes_nothing(family, tmp_path, which):
    out = tmp_path / "out" / "d.delta.safetensors"
    with pytest.raises(DeltaError, match="has NaN or Inf values"):
        extract_delta(family.base, getattr(family, which), out, family.alice, "lossless")
    assert list((tmp_path / "out").iterdir()) == []


def test_extract_refuses_another_architecture(family, tmp_path):
    with pytest.raises(DeltaError, match="architecture differs from the base"):
        extract_delta(family.base, family.other_arch, tmp_path / "d.delta.safetensors", family.alice, "lossless")
    assert list(tmp_path.iterdir()) == []


def test_apply_writes_nothing_on_failure(family, tmp_path):
    path = tmp_path / "d.delta.safetensors"
    extract_delta(family.base, family.expert, path, family.alice, "lossless")
    out_root = tmp_path / "outs"
    out_root.mkdir()
    with pytest.raises(DeltaError):
        apply_delta(family.wrong_base, path, out_root / "rebuilt")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(raw)
    with pytest.raises(DeltaError, match="fails its hash check"):
        apply_delta(family.base, path, out_root / "rebuilt")
    assert list(out_root.iterdir()) == []


def _forge_renamed(path, dst, identity, rename, part_rename=None):
    """``path`` with tensor names changed by ``rename`` (and part names by ``part_rename``),
    stored parts moved along, the architecture made to fit, signed by ``identity``: a
    publisher's consistent, validly signed file whose only fault is its names."""
    from hivemerge.protocol.fingerprint import architecture_fingerprint

    part_rename = part_rename or (lambda p: p)
    header, data = read_container(path)
    meta = header.pop("__metadata__")
    manifest = json.loads(meta[METADATA_KEY])["manifest"]
    tensors, moved = {}, {}
    for name, entry in manifest["tensors"].items():
        entry["parts"] = {part_rename(p): info for p, info in entry["parts"].items()}
        tensors[rename(name)] = entry
    for key, value in header.items():
        if "::" in key and not key.startswith("__files__/"):
            name, part = key.rsplit("::", 1)
            key = f"{rename(name)}::{part_rename(part)}"
        moved[key] = value
    manifest["tensors"] = tensors
    manifest["architecture"] = architecture_fingerprint({n: e["shape"] for n, e in tensors.items()})
    meta[METADATA_KEY] = json.dumps(sign_manifest(identity, "delta", manifest), sort_keys=True, separators=(",", ":"))
    return write_container(dst, {"__metadata__": meta, **moved}, data)


def test_names_that_could_spell_another_entry_are_refused(family, tmp_path):
    """Tensor names make header keys (<tensor>::<part>) and output header entries; a name
    that spells a side file's key, the metadata key or another part's key is refused."""
    path = tmp_path / "d.delta.safetensors"
    extract_delta(family.base, family.expert, path, family.alice, "int8")
    target = "model.layers.0.self_attn.q_proj.weight"
    sane = _forge_renamed(path, tmp_path / "sane.delta.safetensors", family.alice, lambda n: n.replace("model.", "m."))
    DeltaFile(sane).verify_all()  # renaming consistently is fine in itself
    for hostile in ("__metadata__", "a::b", "__files__/config.json", "", "x" * 2000, "tab\there"):
        forged = _forge_renamed(path, tmp_path / "forged.delta.safetensors", family.alice,
                                lambda n: hostile if n == target else n)
        with pytest.raises(DeltaError, match="is not allowed"):
            DeltaFile(forged)
    forged = _forge_renamed(path, tmp_path / "forged.delta.safetensors", family.alice, lambda n: n, lambda p: p.upper())
    with pytest.raises(DeltaError, match="part Q of .* is malformed"):
        DeltaFile(forged)


def test_the_architecture_field_must_say_what_the_tensors_are(family, tmp_path):
    """Records group deltas by it: a signed delta may not claim another architecture."""
    path = tmp_path / "d.delta.safetensors"
    extract_delta(family.base, family.expert, path, family.alice, "int8")
    other = "f" * 64  # a well-formed id of no architecture
    forged = _forge(path, tmp_path / "forged.delta.safetensors", family.alice,
                    change_manifest=lambda m: m.update(architecture=other))
    with pytest.raises(DeltaError, match="architecture does not match its tensors' names and shapes"):
        DeltaFile(forged)
