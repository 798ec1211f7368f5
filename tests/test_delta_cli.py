"""``hivemerge delta extract|apply|verify`` end to end, and every kind of bad input
answered with one ``error:`` line, exit status 2 and nothing written."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from conftest import run_cli
from delta_fixtures import assert_user_error, forge_side_file, load_dir_tensors, resign, rewrite_signed

from hivemerge.merge.deltas.delta import DeltaFile, extract_delta
from hivemerge.merge.io.manifest import model_id
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.protocol.identity import KEY_FILE


@pytest.fixture(scope="module")
def lossless(family, tmp_path_factory):
    """A lossless delta of the expert, extracted by alice through the Python API."""
    path = tmp_path_factory.mktemp("lossless") / "expert.delta.safetensors"
    report = extract_delta(family.base, family.expert, path, family.alice, "lossless")
    return path, report


def tensor_hashes(directory) -> dict[str, str]:
    model = SafetensorsModel(directory)
    return {n: hashlib.sha256(model.raw_bytes(n)).hexdigest() for n in model.names()}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def unwrapped(text: str) -> str:
    return text.replace("\n", "")


def empty_dir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- the happy path ----------------------------------------------------------------------

def test_extract_apply_verify_lossless(cli, family, tmp_path):
    delta = tmp_path / "out" / "expert.delta.safetensors"
    extracted = cli("delta", "extract", "--base", family.base, "--model", family.expert, "--out", delta,
                    "--codec", "lossless", "--home", family.alice_home)
    assert extracted.returncode == 0, extracted.stderr
    delta_id = extracted.stdout.strip()
    assert extracted.stdout == delta_id + "\n" and len(delta_id) == 64
    # (rich wraps long lines on a non-terminal: compare with the line breaks removed)
    assert unwrapped(extracted.stderr).startswith(f"wrote {delta} ({delta.stat().st_size:,} bytes; lossless 6) in ")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["expert.delta.safetensors"]  # no temp files

    applied = cli("delta", "apply", "--base", family.base, "--delta", delta, "--out", tmp_path / "rebuilt")
    assert applied.returncode == 0, applied.stderr
    expert_id = model_id(SafetensorsModel(family.expert))
    assert unwrapped(applied.stderr) == f"wrote {tmp_path / 'rebuilt'}: bit-exact expert, id {expert_id[:12]}"
    assert model_id(SafetensorsModel(tmp_path / "rebuilt")) == expert_id
    assert tensor_hashes(tmp_path / "rebuilt") == tensor_hashes(family.expert)
    assert (tmp_path / "rebuilt" / "config.json").read_bytes() == (family.expert / "config.json").read_bytes()

    verified = cli("delta", "verify", delta, "--base", family.base, "--json")
    assert verified.returncode == 0, verified.stderr
    summary = json.loads(verified.stdout)
    params = sum(t.numel() for t in load_dir_tensors(family.base).values())
    assert summary == {
        "delta_id": delta_id,
        "signer": family.alice.public_hex,
        "signer_fingerprint": family.alice.fingerprint,
        "base_id": model_id(SafetensorsModel(family.base)),
        "expert_id": expert_id,
        "architecture": summary["architecture"],
        "codecs": {"lossless": 6},
        "tensors": 6,
        "parameters": params,
        "file_bytes": delta.stat().st_size,
        "data_bytes": params * 4 + sum((family.expert / f).stat().st_size for f in ("config.json", "tokenizer_config.json")),
        "verified": True,
        "base_checked": True,
    }
    text = cli("delta", "verify", delta, "--signer", family.alice.fingerprint)
    assert text.returncode == 0
    assert f"delta      {delta_id}" in text.stdout and f"signer     {family.alice.fingerprint} ({family.alice.public_hex})" in text.stdout
    assert "codecs     lossless 6" in text.stdout and "(matches --base)" not in text.stdout


def test_extract_default_codec_is_ternary(cli, family, tmp_path):
    delta = tmp_path / "expert.delta.safetensors"
    extracted = cli("delta", "extract", "--base", family.base, "--model", family.expert2, "--out", delta, "--home", family.bob_home)
    assert extracted.returncode == 0, extracted.stderr
    assert json.loads(cli("delta", "verify", delta, "--json").stdout)["codecs"] == {"fp16": 2, "ternary": 4}


def test_extract_sign1_and_verify_reports_the_mix(cli, family, tmp_path):
    delta = tmp_path / "expert.delta.safetensors"
    extracted = cli(
        "delta", "extract", "--base", family.base, "--model", family.expert2, "--out", delta, "--home", family.bob_home,
        "--codec", "sign1",
    )
    assert extracted.returncode == 0, extracted.stderr
    assert f"{delta} ({delta.stat().st_size:,} bytes; fp16 2, sign1 4)" in unwrapped(extracted.stderr)
    summary = json.loads(cli("delta", "verify", delta, "--json").stdout)
    assert summary["delta_id"] == extracted.stdout.strip()
    assert summary["codecs"] == {"fp16": 2, "sign1": 4} and summary["base_checked"] is False
    assert summary["signer_fingerprint"] == family.bob.fingerprint
    assert summary["expert_id"] == model_id(SafetensorsModel(family.expert2))
    shapes = SafetensorsModel(family.base).shapes()
    assert summary["parameters"] == sum(_numel(s) for s in shapes.values())
    # By hand: sign1 stores 1 bit per weight plus one fp16 scale per 128; the 1-D norms stay fp16.
    sign1 = sum(-(-_numel(s) // 8) + 2 * -(-_numel(s) // 128) for s in shapes.values() if len(s) == 2)
    fp16 = sum(2 * _numel(s) for s in shapes.values() if len(s) == 1)
    files = sum((family.expert2 / f).stat().st_size for f in ("config.json", "tokenizer_config.json"))
    assert summary["data_bytes"] == sign1 + fp16 + files
    assert summary["file_bytes"] == delta.stat().st_size > summary["data_bytes"]
    text = cli("delta", "verify", delta, "--base", family.base)
    assert "codecs     fp16 2, sign1 4" in text.stdout and "(matches --base)" in text.stdout
    assert "smaller than fp16" in text.stdout
    applied = cli("delta", "apply", "--base", family.base, "--delta", delta, "--out", tmp_path / "approx")
    assert applied.returncode == 0 and "approximate expert (lossy codec)" in unwrapped(applied.stderr)


def test_the_fork_runner_matches_a_real_process(cli, family, lossless, tmp_path):
    """The fast runner gives what `python -m hivemerge` gives: output, error line, exit code."""
    path, _ = lossless
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    corrupt = tmp_path / "corrupt.delta.safetensors"
    corrupt.write_bytes(raw)
    argv = ["delta", "apply", "--base", family.base, "--delta", corrupt, "--out", tmp_path / "x"]
    real = run_cli(*argv)
    forked = cli(*argv)
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
    assert_user_error(real, str(corrupt), "fails its hash check")
    assert not (tmp_path / "x").exists()


# -- bad input: exit 2, one error line, nothing written -----------------------------------

def check_apply_and_verify_fail(cli, family, delta, tmp_path, *fragments, base=None):
    base = base or family.base
    outs = empty_dir(tmp_path / "outs")
    line = assert_user_error(cli("delta", "apply", "--base", base, "--delta", delta, "--out", outs / "rebuilt"), *fragments)
    assert list(outs.iterdir()) == []
    assert_user_error(cli("delta", "verify", delta, "--base", base), *fragments)
    return line


def test_flipped_bytes(cli, family, lossless, tmp_path):
    path, _ = lossless
    original = path.read_bytes()
    data_start = 8 + int.from_bytes(original[:8], "little")
    header = original[:data_start]
    positions = {
        "length prefix": 0,
        "header key": header.index(b'"__metadata__"') + 3,
        "signature hex": header.index(b'"signature') + 20,
        "manifest": header.index(b'\\"expert\\"') + 30,
        "data offsets": header.rindex(b'"data_offsets":[') + 17,
        "header padding": data_start - 1 if header.endswith(b" ") else data_start - 2,
        "first data byte": data_start,
        "last data byte": len(original) - 1,
    }
    for what, i in positions.items():
        raw = bytearray(original)
        raw[i] ^= 0x04
        corrupt = tmp_path / what.replace(" ", "-") / "d.delta.safetensors"
        corrupt.parent.mkdir()
        corrupt.write_bytes(raw)
        check_apply_and_verify_fail(cli, family, corrupt, corrupt.parent, str(corrupt))


def test_truncated_files(cli, family, lossless, tmp_path):
    path, _ = lossless
    original = path.read_bytes()
    data_start = 8 + int.from_bytes(original[:8], "little")
    for cut, fragment in [(0, "not a readable safetensors file"), (5, "shorter than its header length"),
                          (200, "not a readable safetensors file"), (data_start, "truncated or padded"),
                          (len(original) - 1, f"truncated or padded ({len(original) - 1} bytes, expected {len(original)})")]:
        short = tmp_path / f"cut{cut}" / "d.delta.safetensors"
        short.parent.mkdir()
        short.write_bytes(original[:cut])
        check_apply_and_verify_fail(cli, family, short, short.parent, fragment)


def test_signatures_by_someone_else(cli, family, lossless, tmp_path):
    path, _ = lossless
    forged = rewrite_signed(path, tmp_path / "forged.delta.safetensors", lambda s: resign(s, family.bob, keep_signer=True))
    check_apply_and_verify_fail(cli, family, forged, tmp_path / "a", "signature does not verify", family.alice.fingerprint)
    swapped = rewrite_signed(path, tmp_path / "swapped.delta.safetensors", lambda s: {**s, "signer": family.bob.public_hex})
    check_apply_and_verify_fail(cli, family, swapped, tmp_path / "b", "signature does not verify", family.bob.fingerprint)

    resigned = rewrite_signed(path, tmp_path / "resigned.delta.safetensors", lambda s: resign(s, family.bob))
    assert cli("delta", "verify", resigned).returncode == 0  # a valid delta, published by bob
    assert cli("delta", "verify", path, "--signer", family.alice.fingerprint).returncode == 0
    assert cli("delta", "verify", path, "--signer", family.alice.public_hex).returncode == 0
    for delta, signer, actual in [(resigned, family.alice.fingerprint, family.bob.fingerprint),
                                  (path, family.bob.fingerprint, family.alice.fingerprint),
                                  (path, family.bob.public_hex, family.alice.fingerprint)]:
        result = cli("delta", "verify", delta, "--signer", signer)
        assert_user_error(result, f"signed by {actual}, not by {signer}")
        assert result.stdout == ""


def test_wrong_base(cli, family, lossless, tmp_path):
    path, report = lossless
    wrong_id = model_id(SafetensorsModel(family.wrong_base))
    line = check_apply_and_verify_fail(cli, family, path, tmp_path / "a", base=family.wrong_base)
    assert f"made against base {report.base_id[:12]}, but {family.wrong_base} is {wrong_id[:12]}" in line
    # Same architecture and values in another dtype: another model, another id.
    fp16_id = model_id(SafetensorsModel(family.base_fp16))
    check_apply_and_verify_fail(cli, family, path, tmp_path / "b", report.base_id[:12], fp16_id[:12], base=family.base_fp16)
    # Another architecture: shapes that do not match.
    line = check_apply_and_verify_fail(cli, family, path, tmp_path / "c", "architecture differs", base=family.other_arch)
    assert "has shape [24, 8], expected [24, 16]" in line


@pytest.mark.parametrize("expert,fragment", [
    ("nan_expert", "expert tensor model.layers.1.mlp.up_proj.weight has NaN or Inf values"),
    ("inf_expert", "expert tensor model.layers.0.input_layernorm.weight has NaN or Inf values"),
    ("other_arch", "architecture differs from the base"),
])
def test_extract_refuses_bad_experts(cli, family, tmp_path, expert, fragment):
    out_dir = empty_dir(tmp_path / "out")
    for codec in ("lossless", "int8"):
        result = cli("delta", "extract", "--base", family.base, "--model", getattr(family, expert),
                     "--out", out_dir / "d.delta.safetensors", "--codec", codec, "--home", family.alice_home)
        assert_user_error(result, fragment)
        assert result.stdout == "" and list(out_dir.iterdir()) == []


@pytest.mark.parametrize("codec,fragment", [
    ("nope", "--codec: unknown codec 'nope'; expected one of ['fp16', 'int8', 'lossless', 'lowrank', 'sign1', 'sparse', 'ternary']"),
    ("sparse:density=2", "--codec sparse.density: must be in (0, 1], got 2.0"),
    ("sparse:densty=0.5", "--codec sparse: unknown option 'densty=0.5'"),
])
def test_extract_refuses_bad_codecs(cli, family, tmp_path, codec, fragment):
    out_dir = empty_dir(tmp_path / "out")
    result = cli("delta", "extract", "--base", family.base, "--model", family.expert,
                 "--out", out_dir / "d.delta.safetensors", "--codec", codec, "--home", family.alice_home)
    assert_user_error(result, fragment)
    assert list(out_dir.iterdir()) == []


def test_extract_refuses_a_loose_key(cli, family, tmp_path):
    home = tmp_path / "home"
    assert cli("identity", "new", "--home", home).returncode == 0
    os.chmod(home / KEY_FILE, 0o644)
    out_dir = empty_dir(tmp_path / "out")
    result = cli("delta", "extract", "--base", family.base, "--model", family.expert,
                 "--out", out_dir / "d.delta.safetensors", "--codec", "lossless", "--home", home)
    assert_user_error(result, "permissions 0644 are too open", str(home / KEY_FILE))
    assert list(out_dir.iterdir()) == []
    assert_user_error(cli("delta", "extract", "--base", family.base, "--model", family.expert,
                          "--out", out_dir / "d.delta.safetensors", "--home", tmp_path / "nobody"), "no identity")
    assert list(out_dir.iterdir()) == []


def test_apply_refuses_a_non_empty_out(cli, family, lossless, tmp_path):
    path, _ = lossless
    out = empty_dir(tmp_path / "taken")
    (out / "keep.txt").write_text("mine")
    assert_user_error(cli("delta", "apply", "--base", family.base, "--delta", path, "--out", out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert_user_error(cli("delta", "apply", "--base", family.base, "--delta", tmp_path / "none.delta", "--out", tmp_path / "o"),
                      "no such delta file")
    assert not (tmp_path / "o").exists()


# -- names from a signed delta are never paths ---------------------------------------------

def _files_under(root):
    return sorted(str(p) for p in root.rglob("*"))


@pytest.mark.parametrize("name", ["../../x", "ABSOLUTE", "sub/config.json", "evil.py"])
def test_side_file_names_that_are_not_model_files_are_refused(cli, family, lossless, tmp_path, name):
    """A delta correctly signed by its publisher whose side file is named ``name``:
    verify and apply answer exit 2 and write nothing, neither --out nor where the name points."""
    path, _ = lossless
    if name == "ABSOLUTE":
        name = str(tmp_path / "abs")
    forged = forge_side_file(path, tmp_path / "forged.delta.safetensors", family.alice, "config.json", name)
    outs = empty_dir(tmp_path / "outs")
    before = _files_under(tmp_path)
    line = assert_user_error(cli("delta", "apply", "--base", family.base, "--delta", forged, "--out", outs / "rebuilt"),
                             f"file {name!r} is not a model side file")
    assert "signature" not in line  # the signature is fine: the name is what is refused
    assert_user_error(cli("delta", "verify", forged), f"file {name!r} is not a model side file")
    assert_user_error(cli("delta", "verify", forged, "--base", family.base), "is not a model side file")
    # nothing written: no --out, nothing where ../../x (tmp_path/x) or the absolute path lead
    assert not (outs / "rebuilt").exists() and not (tmp_path / "x").exists() and not (tmp_path / "abs").exists()
    assert _files_under(tmp_path) == before


def test_extract_refuses_side_files_and_weights_linked_out_of_the_model_folder(cli, family, tmp_path):
    """A model folder whose config.json is a link to a private file elsewhere: extract
    (and so publish, which extracts) must not embed that file in a delta."""
    import shutil

    secret = tmp_path / "secret.json"
    secret.write_text('{"api_token": "hunter2"}')
    expert = tmp_path / "expert"
    shutil.copytree(family.expert, expert)
    (expert / "config.json").unlink()
    (expert / "config.json").symlink_to(secret)
    out_dir = empty_dir(tmp_path / "out")

    def extract(model):
        return cli("delta", "extract", "--base", family.base, "--model", model, "--out", out_dir / "d.delta.safetensors",
                   "--codec", "lossless", "--home", family.alice_home)

    assert_user_error(extract(expert), f"{expert / 'config.json'}: a symbolic link out of the model folder")
    assert list(out_dir.iterdir()) == []
    # weights linked out of the folder: refused the same way
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(family.expert / "config.json", expert / "real-config.json")
    (expert / "config.json").unlink()
    (expert / "config.json").symlink_to("real-config.json")  # a link inside the folder is its own file
    shutil.move(expert / "model.safetensors", weights / "model.safetensors")
    (expert / "model.safetensors").symlink_to(weights / "model.safetensors")
    assert_user_error(extract(expert), f"{expert / 'model.safetensors'}: a symbolic link out of the model folder")
    assert list(out_dir.iterdir()) == []
    (expert / "model.safetensors").unlink()
    shutil.move(weights / "model.safetensors", expert / "model.safetensors")
    assert extract(expert).returncode == 0
    assert json.loads(DeltaFile(out_dir / "d.delta.safetensors").files()["config.json"]) == \
        json.loads((family.expert / "config.json").read_bytes())
