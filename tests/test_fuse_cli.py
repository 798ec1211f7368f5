"""``hivemerge pack make|verify`` and ``hivemerge fuse`` end to end: the happy path, and
bad input answered with one ``error:`` line, exit status 2 and nothing written."""

from __future__ import annotations

import json

import pytest
from delta_fixtures import assert_user_error
from fuse_fixtures import shared_hetero

from hivemerge.merge.fusion.packs import PackFile


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return shared_hetero(tmp_path_factory)


@pytest.fixture(scope="module")
def home(cli, tmp_path_factory):
    home = tmp_path_factory.mktemp("fuse-home")
    assert cli("identity", "new", "--home", home).returncode == 0
    return home


@pytest.fixture(scope="module")
def made(cli, setup, home, tmp_path_factory):
    out = tmp_path_factory.mktemp("packs") / "expert.pack.safetensors"
    result = cli("pack", "make", setup.expert, "--probe", setup.probe.path, "--out", out, "--top-k", "4", "--home", home)
    assert result.returncode == 0, result.stderr
    return out, result


def test_pack_make_and_verify(cli, setup, made):
    path, result = made
    pack = PackFile(path)
    assert result.stdout.strip() == pack.id
    assert "bytes/token" in result.stderr and pack.manifest["top_k"] == 4
    summary = cli("pack", "verify", path, "--probe", setup.probe.path, "--json").json()
    assert summary["verified"] and summary["probe_checked"] and summary["pack_id"] == pack.id
    assert summary["probe_id"] == setup.probe.id and summary["examples"] == 200
    # top-4: 4 int16 ids + 4 fp16 log-probs + target and its log-prob = 20 bytes a token, plus the header.
    assert 20 <= summary["bytes_per_token"] < 40
    text = cli("pack", "verify", path)
    assert text.returncode == 0 and "signature and every hash OK" in text.stdout


def test_fuse_writes_the_model_and_a_verifiable_delta(cli, setup, made, home, tmp_path):
    path, _ = made
    out = tmp_path / "fused"
    result = cli("fuse", "--pivot", setup.pivot, "--packs", path, "--probe", setup.probe.path, "--out", out,
                 "--steps", "5", "--lambda", "0.3", "--method", "avgce", "--home", home)
    assert result.returncode == 0, result.stderr
    delta = tmp_path / "fused.delta.safetensors"
    assert (out / "config.json").is_file() and delta.is_file()
    report = json.loads((out / "fusion.json").read_text())
    assert report["method"] == "avgce" and report["config"]["lam"] == 0.3 and report["config"]["steps"] == 5
    assert result.stdout.strip() == report["delta_id"]
    verified = cli("delta", "verify", delta, "--base", setup.pivot, "--json").json()
    assert verified["delta_id"] == report["delta_id"] and verified["base_checked"]


def test_a_flipped_byte_is_refused_with_exit_2(cli, setup, made, home, tmp_path):
    path, _ = made
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x01  # in the data section: a log-prob or an id
    bad = tmp_path / "bad.pack.safetensors"
    bad.write_bytes(bytes(data))
    assert_user_error(cli("pack", "verify", bad), "fails its hash check")
    out = tmp_path / "fused"
    assert_user_error(cli("fuse", "--pivot", setup.pivot, "--packs", bad, "--probe", setup.probe.path, "--out", out,
                          "--steps", "1", "--home", home), "fails its hash check")
    assert not out.exists() and not (tmp_path / "fused.delta.safetensors").exists()


def test_a_pack_for_another_probe_is_refused_with_exit_2(cli, setup, made, home, tmp_path):
    path, _ = made
    assert_user_error(cli("pack", "verify", path, "--probe", setup.other_probe.path), "made for probe set")
    out = tmp_path / "fused"
    assert_user_error(cli("fuse", "--pivot", setup.pivot, "--packs", path, "--probe", setup.other_probe.path, "--out", out,
                          "--steps", "1", "--home", home), "made for probe set")
    assert not out.exists()


def test_bad_options_are_refused_with_exit_2(cli, setup, made, home, tmp_path):
    path, _ = made
    common = ["--pivot", setup.pivot, "--packs", path, "--probe", setup.probe.path, "--out", tmp_path / "x", "--home", home]
    assert_user_error(cli("fuse", *common, "--method", "max"), "--method")
    assert_user_error(cli("fuse", *common, "--lambda", "1.5"), "--lambda")
    assert_user_error(cli("fuse", *common, "--signer", "0123456789abcdef"), "not by any --signer")
    assert_user_error(cli("pack", "verify", path, "--signer", "0123456789abcdef"), "not by 0123456789abcdef")
    missing = tmp_path / "none.jsonl"
    assert_user_error(cli("fuse", *common[:4], "--probe", missing, *common[6:]), "no such probe file")
    assert not (tmp_path / "x").exists()
