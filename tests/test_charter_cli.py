"""``hivemerge network new|show|add|remove|set|sign|publish`` (node/cli/charter.py) and the
checks ``node start --network`` makes before a node starts: charters as files, signed in
several homes, and every bad input answered with one ``error:`` line, exit 2 and nothing
written. The node side (``show`` without a file, ``publish``) runs against a stub node
behind the real control socket."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch
from conftest import write_tensors
from delta_fixtures import assert_user_error, shared_runner
from network_fixtures import NodeProcess, wait_until

from hivemerge.merge.io.manifest import model_id
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.merge.methods import METHODS
from hivemerge.node import control
from hivemerge.node.cli.charter import MAX_CHARTER_FILE_BYTES, network_ref, write_charter
from hivemerge.protocol import bounds
from hivemerge.protocol.charter import (
    CharterError,
    charter_id,
    genesis_ok,
    new_charter,
    propose_change,
    sign_charter,
    successor_ok,
)
from hivemerge.protocol.identity import Identity

OTHER_BASE = "ab" * 32  # a base given by its id


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    return shared_runner(tmp_path_factory)


@pytest.fixture(scope="module")
def net(cli, tmp_path_factory):
    """A base model folder and four homes, each with an identity made by ``identity new``:
    a, b, c (the maintainers) and x (an outsider)."""
    root = tmp_path_factory.mktemp("charter-cli")
    base = write_tensors(root / "base", {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, {"num_hidden_layers": 1})
    homes, keys = {}, {}
    for who in "abcx":
        made = cli("identity", "new", "--home", root / who, "--json")
        homes[who], keys[who] = root / who, made.json()["public_key"]
    return types.SimpleNamespace(root=root, base=base, base_id=model_id(SafetensorsModel(base)), homes=homes, keys=keys)


def show(cli, *args) -> dict:
    return cli("network", "show", *args, "--json").json()


def genesis_2_of_3(cli, net, out: Path, *extra) -> str:
    """A genesis with a, b, c as maintainers (k = 2), written by a (so signed by a)."""
    made = cli("network", "new", "--name", "testnet", "--base", net.base, "--base", OTHER_BASE,
               *(arg for who in "abc" for arg in ("--maintainer", net.keys[who])), "--threshold", "2",
               "--proposer", net.keys["a"], "--attester", net.keys["a"], "--attester", net.keys["b"],
               "--attester", net.keys["c"], "--contributor", net.keys["c"], "--method", "ties", "--method", "linear",
               "--quorum", "0.75", "--min-attesters", "2", "--out", out, "--home", net.homes["a"], *extra)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def signed_genesis(cli, net, out: Path) -> dict:
    genesis_2_of_3(cli, net, out)
    assert cli("network", "sign", out, "--home", net.homes["b"]).returncode == 0
    return json.loads(out.read_text())


# -- new and show -----------------------------------------------------------------------------

def test_new_then_show_round_trip(cli, net, tmp_path):
    out = tmp_path / "charter.json"
    printed = genesis_2_of_3(cli, net, out)
    signed = json.loads(out.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["charter.json"]  # no temporary file left
    assert printed == charter_id(signed["charter"]) and len(printed) == 64
    a, b, c = (net.keys[w] for w in "abc")
    described = show(cli, out)
    assert described == {
        "id": printed, "name": "testnet", "version": 0, "previous": None,
        "base_ids": sorted([net.base_id, OTHER_BASE]), "maintainers": sorted([a, b, c]), "threshold": 2,
        "roster": {"attester": sorted([a, b, c]), "contributor": [c], "proposer": [a]},
        "open_contribution": False, "policy": {**signed["charter"]["policy"], "methods": ["linear", "ties"]},
        "attestations_needed": 3,  # max(min 2, ceil(0.75 x 3) = 3, 3 // 2 + 1 = 2)
        "signatures": {a: "valid"}, "counting": [a], "needed": 2, "genesis_ok": False,
    }
    assert described["policy"]["quorum"] == 0.75 and described["policy"]["min_attesters"] == 2
    assert signed["charter"]["roster"] == {a: ["attester", "proposer"], b: ["attester"], c: ["attester", "contributor"]}

    text = cli("network", "show", out)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[:3] == ["network      testnet", f"charter      {printed}", "version      0 (genesis)"]
    assert "maintainers  3, of whom 2 must sign the next version" in lines
    assert f"  {Identity.load(net.homes['a']).fingerprint}  {a}  counts" in lines
    assert "  1 counting, 2 needed: not (yet) valid as a genesis" in lines
    assert "             final with 3 of the 3 attesters (quorum 0.75, at least 2)" in lines


def test_new_defaults_to_the_home_as_the_only_maintainer_with_every_role(cli, net, tmp_path):
    out = tmp_path / "solo.json"
    made = cli("network", "new", "--name", "solo", "--base", net.base, "--out", out, "--home", net.homes["x"])
    assert made.returncode == 0, made.stderr
    assert "signatures: 1 counting, 1 needed" in made.stderr
    signed = json.loads(out.read_text())
    x = net.keys["x"]
    assert signed["charter"]["maintainers"] == [x] and signed["charter"]["threshold"] == 1
    assert signed["charter"]["roster"] == {x: ["attester", "contributor", "proposer"]}
    assert signed["charter"]["policy"]["methods"] == sorted(METHODS) and len(METHODS) >= 10
    assert signed["charter"]["policy"]["quorum"] == 2 / 3
    assert list(signed["signatures"]) == [x] and genesis_ok(signed)
    assert network_ref(str(out)) == signed  # what `node start --network solo.json` hands the node


# -- signing: k of n, in three homes -------------------------------------------------------

def test_k_of_n_signing_across_three_homes(cli, net, tmp_path):
    out = tmp_path / "charter.json"
    cid = genesis_2_of_3(cli, net, out)
    with pytest.raises(CharterError, match="signed by 1 of its maintainers, 2 needed"):
        network_ref(str(out))  # `node start --network` refuses it: 1 of 2
    for who, counting in (("b", 2), ("c", 3)):
        signing = cli("network", "sign", out, "--home", net.homes[who])
        assert signing.returncode == 0, signing.stderr
        assert signing.stdout.strip() == cid  # signing does not change the document, nor its id
        assert signing.stderr.splitlines() == [
            f"signed {out} as {Identity.load(net.homes[who]).fingerprint}; signatures: {counting} counting, 2 needed"]
        described = show(cli, out)
        assert described["counting"] == sorted(net.keys[w] for w in "abc"[:counting])
        assert described["genesis_ok"] is True and described["id"] == cid
    signed = json.loads(out.read_text())
    assert sorted(signed["signatures"]) == sorted(net.keys[w] for w in "abc") and genesis_ok(signed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["charter.json"]
    again = cli("network", "sign", out, "--home", net.homes["c"])  # a second signature by c: the same bytes
    assert again.returncode == 0 and json.loads(out.read_text()) == signed
    assert network_ref(str(out)) == signed and network_ref(cid) == cid and network_ref(f"hm://{cid}") == cid


def test_a_signature_by_a_non_maintainer_is_shown_as_not_counting(cli, net, tmp_path):
    out = tmp_path / "charter.json"
    genesis_2_of_3(cli, net, out)
    signing = cli("network", "sign", out, "--home", net.homes["x"])
    assert signing.returncode == 0
    x_fingerprint = Identity.load(net.homes["x"]).fingerprint
    assert signing.stderr.splitlines() == [
        f"warning: {x_fingerprint} is not a maintainer of this genesis: its signature does not count",
        f"signed {out} as {x_fingerprint}; signatures: 1 counting, 2 needed"]
    described = show(cli, out)
    assert described["signatures"] == {net.keys["a"]: "valid", net.keys["x"]: "valid"}
    assert described["counting"] == [net.keys["a"]] and described["genesis_ok"] is False
    text = cli("network", "show", out).stdout.splitlines()
    assert f"  {x_fingerprint}  {net.keys['x']}  valid, but not one of this version's maintainers: does not count" in text
    assert "  1 counting, 2 needed: not (yet) valid as a genesis" in text

    # b's signature, then a byte of it flipped: shown as bad, and not counted
    assert cli("network", "sign", out, "--home", net.homes["b"]).returncode == 0
    assert show(cli, out)["genesis_ok"] is True
    signed = json.loads(out.read_text())
    flipped = signed["signatures"][net.keys["b"]]
    signed["signatures"][net.keys["b"]] = ("0" if flipped[0] != "0" else "1") + flipped[1:]
    out.write_text(json.dumps(signed))
    described = show(cli, out)
    assert described["signatures"][net.keys["b"]] == "invalid" and described["counting"] == [net.keys["a"]]
    assert described["genesis_ok"] is False
    assert f"{net.keys['b']}  bad signature: does not count" in cli("network", "show", out).stdout


# -- add / remove / set: the next version ------------------------------------------------------

def test_add_and_remove_propose_version_1_naming_version_0(cli, net, tmp_path):
    genesis = signed_genesis(cli, net, tmp_path / "v0.json")
    v0_id, x = charter_id(genesis["charter"]), net.keys["x"]
    added = cli("network", "add", x, "--role", "attester", "--role", "contributor", "--from", tmp_path / "v0.json",
                "--out", tmp_path / "v1.json", "--home", net.homes["a"])
    assert added.returncode == 0, added.stderr
    v1 = json.loads((tmp_path / "v1.json").read_text())
    assert added.stdout.strip() == charter_id(v1["charter"])
    assert v1["charter"]["version"] == 1 and v1["charter"]["previous"] == v0_id
    assert v1["charter"]["roster"][x] == ["attester", "contributor"]
    assert {k: v for k, v in v1["charter"].items() if k not in ("roster", "version", "previous")} == \
        {k: v for k, v in genesis["charter"].items() if k not in ("roster", "version", "previous")}
    assert list(v1["signatures"]) == [net.keys["a"]]  # a maintains version 0: its home signed the proposal
    assert "signatures: 1 counting, 2 needed" in added.stderr

    # offline, whose signatures count on an update is known only with the previous version
    assert show(cli, tmp_path / "v1.json")["counting"] is None
    checked = show(cli, tmp_path / "v1.json", "--previous", tmp_path / "v0.json")
    assert (checked["counting"], checked["needed"], checked["successor_ok"]) == ([net.keys["a"]], 2, False)
    signing = cli("network", "sign", tmp_path / "v1.json", "--previous", tmp_path / "v0.json", "--home", net.homes["c"])
    assert signing.returncode == 0 and signing.stderr.endswith("signatures: 2 counting, 2 needed\n")
    assert show(cli, tmp_path / "v1.json", "--previous", tmp_path / "v0.json")["successor_ok"] is True
    assert successor_ok(genesis, json.loads((tmp_path / "v1.json").read_text()))

    # remove: one role, then the key; printed (not written) without --out, unsigned by a home that is no maintainer
    printed = cli("network", "remove", x, "--role", "contributor", "--from", tmp_path / "v1.json", "--home", net.homes["x"])
    assert printed.returncode == 0, printed.stderr
    v2 = json.loads(printed.stdout)
    assert v2["signatures"] == {} and v2["charter"]["version"] == 2
    assert v2["charter"]["previous"] == charter_id(v1["charter"]) and v2["charter"]["roster"][x] == ["attester"]
    removed = cli("network", "remove", x, "--from", tmp_path / "v1.json", "--out", tmp_path / "v2.json",
                  "--home", net.homes["x"])
    assert removed.returncode == 0, removed.stderr
    v2 = json.loads((tmp_path / "v2.json").read_text())
    assert x not in v2["charter"]["roster"] and v2["charter"]["roster"] == genesis["charter"]["roster"]
    assert v2["signatures"] == {}


def test_sign_warns_when_the_previous_version_is_not_given_or_not_maintained(cli, net, tmp_path):
    signed_genesis(cli, net, tmp_path / "v0.json")
    assert cli("network", "add", net.keys["x"], "--role", "proposer", "--from", tmp_path / "v0.json",
               "--out", tmp_path / "v1.json", "--home", net.homes["x"]).returncode == 0
    blind = cli("network", "sign", tmp_path / "v1.json", "--home", net.homes["b"])
    assert blind.returncode == 0
    assert blind.stderr.splitlines()[0] == ("warning: your signature counts only if you are a maintainer of version 0 "
                                            "(pass --previous FILE to check)")
    outsider = cli("network", "sign", tmp_path / "v1.json", "--previous", tmp_path / "v0.json", "--home", net.homes["x"])
    assert outsider.returncode == 0
    assert outsider.stderr.splitlines() == [
        f"warning: {Identity.load(net.homes['x']).fingerprint} is not a maintainer of version 0: its signature does not count",
        f"signed {tmp_path / 'v1.json'} as {Identity.load(net.homes['x']).fingerprint}; signatures: 1 counting, 2 needed"]


def test_set_changes_the_policy_and_maintainers(cli, net, tmp_path):
    genesis = signed_genesis(cli, net, tmp_path / "v0.json")
    changed = cli("network", "set", "--from", tmp_path / "v0.json", "--quorum", "1", "--min-attesters", "3",
                  "--method", "slerp", "--maintainer", net.keys["x"], "--maintainer", net.keys["a"], "--threshold", "1",
                  "--open-contribution", "--out", tmp_path / "v1.json", "--home", net.homes["b"])
    assert changed.returncode == 0, changed.stderr
    v1 = json.loads((tmp_path / "v1.json").read_text())["charter"]
    assert v1["policy"]["quorum"] == 1.0 and v1["policy"]["min_attesters"] == 3 and v1["policy"]["methods"] == ["slerp"]
    assert v1["maintainers"] == sorted([net.keys["x"], net.keys["a"]]) and v1["threshold"] == 1
    assert v1["open_contribution"] is True and v1["roster"] == genesis["charter"]["roster"]
    assert v1["previous"] == charter_id(genesis["charter"])


# -- bad input: exit 2, one error line, nothing written -----------------------------------------

def _bad_cases(net, d: Path) -> dict:
    a, x, v0, v1 = net.keys["a"], net.keys["x"], d / "v0.json", d / "v1.json"
    new = ["network", "new", "--name", "t", "--base", net.base, "--home", net.homes["a"], "--out", d / "new.json"]
    return {
        "bad maintainer key": ([*new, "--maintainer", "0" * 63], "--maintainer '000", "not a public key"),
        "non-hex key": ([*new, "--attester", "z" * 64], "--attester 'zzz", "not a public key"),
        "threshold over maintainers": ([*new, "--maintainer", a, "--threshold", "2"], "threshold 2 exceeds the 1 maintainers"),
        "quorum 0.4": ([*new, "--quorum", "0.4"], "policy.quorum", "greater than 0.5"),
        "min attesters over roster": ([*new, "--min-attesters", "2"], "min_attesters 2 exceeds the roster's 1 attesters"),
        "unknown method": ([*new, "--method", "mystery"], "--method 'mystery': unknown"),
        "name that is a path": ([*new[:3], "../t", *new[4:]], "charter.name"),
        "base neither folder nor id": ([*new[:5], d / "nothing", *new[6:]], "neither a model directory nor a model id"),
        "existing out": ([*new[:-1], v0], f"--out {v0}: exists (pass --overwrite"),
        "add unknown role": (["network", "add", x, "--role", "boss", "--from", v0, "--out", v1], "role 'boss'"),
        "add without role": (["network", "add", x, "--from", v0, "--out", v1], "--role: name at least one"),
        "add bad key": (["network", "add", "x" + a[1:], "--role", "attester", "--from", v0, "--out", v1], "KEY 'x"),
        "remove a key off the roster": (["network", "remove", x, "--from", v0, "--out", v1], "not on the roster"),
        "add onto an existing out": (["network", "add", x, "--role", "attester", "--from", v0, "--out", d / "junk.json"],
                                     "exists"),
        "set nothing": (["network", "set", "--from", v0, "--out", v1], "nothing to change"),
        "set threshold over maintainers": (["network", "set", "--from", v0, "--threshold", "4", "--out", v1],
                                           "threshold 4 exceeds the 3 maintainers"),
        "from garbage": (["network", "add", x, "--role", "attester", "--from", d / "junk.json", "--out", v1], "not JSON"),
        "from a missing file": (["network", "add", x, "--role", "attester", "--from", d / "none.json", "--out", v1],
                                "none.json"),
        "sign garbage": (["network", "sign", d / "junk.json", "--home", net.homes["a"]], "not JSON"),
        "sign with no identity": (["network", "sign", v0, "--home", d / "nobody"], "no identity"),
        "sign a genesis with --previous": (["network", "sign", v0, "--previous", v0, "--home", net.homes["a"]],
                                           "it has no previous version"),
        "previous that is another charter": (["network", "show", d / "update.json", "--previous", v0],
                                             f"--previous {v0}: is charter", "but this version's previous is"),
        "show an oversized file": (["network", "show", d / "huge.json"], f"over {MAX_CHARTER_FILE_BYTES:,} bytes"),
        "show a charter with a bad field": (["network", "show", d / "bad-field.json"], "threshold 3 exceeds the 1 maintainers"),
        "start an unsigned genesis": (["node", "start", "--network", d / "unsigned.json", "--home", d / "node"],
                                      "signed by 0 of its maintainers, 1 needed"),
        "start from version 1": (["node", "start", "--network", d / "update.json", "--home", d / "node"],
                                 "version 1, not a genesis"),
        "start from garbage": (["node", "start", "--network", d / "junk.json", "--home", d / "node"], "not JSON"),
        "start from nothing": (["node", "start", "--network", "nowhere", "--home", d / "node"],
                               "neither a charter file nor a network id"),
    }


# The cases' names, for pytest to list them before any fixture exists (placeholders otherwise).
BAD = sorted(_bad_cases(types.SimpleNamespace(keys=dict.fromkeys("abcx", "0" * 64), homes=dict.fromkeys("abcx", Path()),
                                              base=Path()), Path()))


@pytest.fixture(scope="module")
def bad_dir(cli, net, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    signed_genesis(cli, net, d / "v0.json")
    (d / "junk.json").write_text('{"charter": ')
    (d / "huge.json").write_bytes(b" " * (MAX_CHARTER_FILE_BYTES + 1))
    bad = json.loads((d / "v0.json").read_text())
    bad["charter"]["threshold"], bad["charter"]["maintainers"] = 3, [net.keys["a"]]
    (d / "bad-field.json").write_text(json.dumps(bad))
    unsigned = new_charter(name="u", base_ids=[OTHER_BASE], maintainers=[net.keys["a"]], methods=["linear"],
                           roster={net.keys["a"]: ["attester"]})
    (d / "unsigned.json").write_text(json.dumps(unsigned))
    identity = Identity.load(net.homes["a"])
    (d / "update.json").write_text(json.dumps(sign_charter(propose_change(sign_charter(unsigned, identity), quorum=1.0),
                                                           identity)))
    return d


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(cli, net, bad_dir, case):
    argv, *fragments = _bad_cases(net, bad_dir)[case]
    before = {p.name: p.read_bytes() for p in bad_dir.iterdir()}
    assert_user_error(cli(*argv), *(str(f) for f in fragments))
    assert {p.name: p.read_bytes() for p in bad_dir.iterdir()} == before  # nothing written, nothing changed


def test_the_file_cap_admits_the_largest_charter(tmp_path):
    """The reading cap never refuses an honest file: the largest charter the schema allows,
    written as the CLI writes it (indented), fits with room to spare."""
    keys = [Identity.generate() for _ in range(bounds.MAX_MAINTAINERS)]
    largest = new_charter(name="n" * 64, base_ids=[f"{i:064x}" for i in range(bounds.MAX_CHARTER_BASES)],
                          maintainers=[k.public_hex for k in keys],
                          methods=[f"method_{i}" for i in range(bounds.MAX_CHARTER_METHODS)],
                          roster={f"{i:064x}": ["attester", "contributor", "proposer"] for i in range(bounds.MAX_ROSTER)})
    for key in keys:
        largest = sign_charter(largest, key)
    write_charter(tmp_path / "largest.json", largest)
    size = (tmp_path / "largest.json").stat().st_size
    assert 2 * bounds.MAX_CHARTER_RECORD_BYTES > size > bounds.MAX_CHARTER_RECORD_BYTES * 3 // 4
    assert size < MAX_CHARTER_FILE_BYTES / 2


# -- the node side, against a stub node behind the real control socket ---------------------------

@pytest.fixture
def stub_node(net, tmp_path, monkeypatch):
    """A control server on a fresh home whose node answers ``charter`` and ``publish_charter``
    as Node.charter_status / Node.publish_charter are to, recording what it was handed."""
    home = tmp_path / "node-home"
    home.mkdir()
    state = types.SimpleNamespace(following=None, published=[])

    def charter_status():
        signed = state.following
        if signed is None:
            return {"charter": None, "genesis_id": None, "id": None, "version": None}
        return {"charter": signed, "genesis_id": state.genesis_id, "id": charter_id(signed["charter"]),
                "version": signed["charter"]["version"]}

    def publish_charter(charter):
        state.published.append(charter)
        return {"adopted": True, "id": charter_id(charter["charter"]), "version": charter["charter"]["version"]}

    commands = control.COMMANDS
    node = types.SimpleNamespace(**{name: (lambda **args: {}) for name in commands})
    node.charter_status, node.publish_charter = charter_status, publish_charter
    server = control.ControlServer(home, node)
    state.home = home
    yield state
    server.close()


def test_show_without_a_file_asks_the_running_node(cli, net, stub_node, tmp_path):
    private = cli("network", "show", "--home", stub_node.home)
    assert private.returncode == 0, private.stderr
    assert private.stdout == f"the node on {stub_node.home} runs a private test network without a charter\n"
    assert show(cli, "--home", stub_node.home) == {"charter": None, "genesis_id": None, "id": None, "version": None}

    genesis = signed_genesis(cli, net, tmp_path / "v0.json")
    stub_node.following, stub_node.genesis_id = genesis, charter_id(genesis["charter"])
    status = show(cli, "--home", stub_node.home)
    assert status["id"] == status["genesis_id"] == status["charter"]["id"] == charter_id(genesis["charter"])
    assert status["version"] == 0 and status["charter"]["counting"] == sorted([net.keys["a"], net.keys["b"]])
    text = cli("network", "show", "--home", stub_node.home).stdout.splitlines()
    assert text[0] == f"the node on {stub_node.home} follows version 0 of network testnet (genesis {stub_node.genesis_id})"
    assert text[1] == "network      testnet"


def test_publish_hands_the_charter_to_the_running_node(cli, net, stub_node, tmp_path):
    genesis = signed_genesis(cli, net, tmp_path / "v0.json")
    published = cli("network", "publish", tmp_path / "v0.json", "--home", stub_node.home)
    assert published.returncode == 0, published.stderr
    assert stub_node.published == [genesis]  # exactly the file's charter, signatures and all
    cid = charter_id(genesis["charter"])
    assert published.stdout == f"adopted: charter {cid[:12]} version 0; the node follows version 0\n"
    answer = cli("network", "publish", tmp_path / "v0.json", "--home", stub_node.home, "--json").json()
    assert answer == {"adopted": True, "id": cid, "version": 0}


def test_node_commands_without_a_node_say_so(cli, net, tmp_path):
    signed_genesis(cli, net, tmp_path / "v0.json")
    assert_user_error(cli("network", "publish", tmp_path / "v0.json", "--home", tmp_path / "idle"),
                      f"no node is running on {tmp_path / 'idle'}")
    assert_user_error(cli("network", "show", "--home", tmp_path / "idle"), "no node is running", "pass a charter FILE")
    assert not (tmp_path / "idle").exists()


def test_the_attestations_needed_follow_the_charter(cli, net, tmp_path):
    """The figure `show` prints is the protocol's, for a roster of 3 attesters and quorum 0.75."""
    genesis_2_of_3(cli, net, tmp_path / "v0.json")
    assert show(cli, tmp_path / "v0.json")["attestations_needed"] == max(2, math.ceil(0.75 * 3), 3 // 2 + 1) == 3


def test_nodes_on_a_charter_find_its_genesis_and_follow_a_published_update(cli, net, tmp_path):
    """Real nodes: ``a`` starts from the genesis file, ``c`` from its id alone (found on the
    DHT); a version signed by 2 of the 3 maintainers, handed to ``a`` with ``network
    publish``, is followed by both."""
    genesis_file, update = tmp_path / "v0.json", tmp_path / "v1.json"
    genesis = signed_genesis(cli, net, genesis_file)
    gid = charter_id(genesis["charter"])
    a = NodeProcess(net.homes["a"], extra=["--network", genesis_file]).wait_serving()
    c = None
    try:
        c = NodeProcess(net.homes["c"], peers=a.maddrs, extra=["--network", gid]).wait_serving()
        assert show(cli, "--home", net.homes["c"])["id"] == gid and show(cli, "--home", net.homes["a"])["version"] == 0
        made = cli("network", "add", net.keys["x"], "--role", "contributor", "--from", genesis_file, "--out", update,
                   "--home", net.homes["a"])
        assert made.returncode == 0, made.stderr
        assert cli("network", "sign", update, "--home", net.homes["b"]).returncode == 0
        published = cli("network", "publish", update, "--home", net.homes["a"], "--json")
        assert published.returncode == 0, published.stderr
        assert published.json() == {"adopted": True, "id": charter_id(json.loads(update.read_text())["charter"]), "version": 1}
        wait_until(lambda: show(cli, "--home", net.homes["c"])["version"] == 1, 40, what="c to follow version 1")
        followed = show(cli, "--home", net.homes["c"])["charter"]
        assert followed["version"] == 1 and followed["roster"]["contributor"] == sorted([net.keys["c"], net.keys["x"]])
        # commands through a running node work within its network: a --network beside it is refused
        fetch = ("fetch", "--out", tmp_path / "out", "--base", net.base)
        assert_user_error(cli(*fetch, "--network", genesis_file, "--home", net.homes["a"]), "--network: a node is running")
        # a --peer client checks --network before it starts
        assert_user_error(cli(*fetch, "--peer", a.maddrs[0], "--network", tmp_path / "absent.json", "--home", net.homes["x"]),
                          "neither a charter file nor a network id")
        assert not (tmp_path / "out").exists()
    finally:
        for node in (c, a):
            if node is not None:
                node.close()


def test_fetch_trust_takes_keys_or_a_file_of_them_and_refuses_anything_else(cli, net, tmp_path):
    from hivemerge.node.cli.network import trusted_keys

    listed = tmp_path / "trusted.txt"
    listed.write_text(f"# the maintainers\n{net.keys['a'].upper()}\n\n{net.keys['b']}  # b\n")
    assert trusted_keys([str(listed), net.keys["c"]]) == sorted(net.keys[w] for w in "abc")
    for bad in ("abc", str(tmp_path / "absent.txt")):
        result = cli("fetch", "--out", tmp_path / "out", "--base", net.base, "--trust", bad, "--home", net.homes["x"])
        assert_user_error(result, "--trust")
        assert not (tmp_path / "out").exists()
    listed.write_text("not-a-key\n")
    assert_user_error(cli("fetch", "--out", tmp_path / "out", "--base", net.base, "--trust", listed, "--home", net.homes["x"]),
                      "not a public key")
