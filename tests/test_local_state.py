"""The node's own files: written durably, and one damaged state file is skipped with a
log line instead of stopping every tick of its coordinator (node/storage/home.py)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from types import SimpleNamespace

import pytest

from hivemerge.node.storage.home import JsonStates, write_json

VALID = {"proposal": {"round_id": "a" * 64, "base_id": "e" * 64, "deadline": 1.0}, "phase": "attested", "final": True, "result_id": "b" * 64}
DAMAGED = {
    "torn": b'{"proposal": {"round_id": "' + b"c" * 30,  # cut short by a crash mid-write
    "empty": b"",  # renamed into place before its data reached the disk
    "a-list": b"[1, 2]",
    "no-proposal": b'{"phase": "committed"}',
    "deep": b"[" * 100_000,
    "not-utf8": b"\xff\xfe{}",
}


def test_write_json_reaches_the_disk_before_its_name(tmp_path, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((str(a), str(b), list(synced))), real_replace(a, b)))
    path = tmp_path / "state.json"
    write_json(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    ((tmp, target, synced_before),) = renamed
    assert target == str(path) and synced_before == [tmp]  # the data, then the rename
    assert synced[-1] == str(tmp_path)  # and the folder entry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_leaves_the_former_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    write_json(path, {"x": 1})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def _states(tmp_path):
    logged = []
    states = JsonStates()
    states.dir = tmp_path
    states.node = SimpleNamespace(log=logged.append)
    return states, logged


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_a_damaged_state_file_is_logged_and_skipped(tmp_path, damage):
    states, logged = _states(tmp_path)
    states.save(VALID)
    (tmp_path / f"{damage}.json").write_bytes(DAMAGED[damage])
    assert states.states() == [VALID]  # the valid one is still returned
    assert len(logged) == 1 and logged[0].startswith(f"skipping the damaged state file {tmp_path / damage}.json (")
    assert states.state(damage) is None and len(logged) == 2
    assert states.state("a" * 64) == VALID
    assert (tmp_path / f"{damage}.json").read_bytes() == DAMAGED[damage]  # left for its owner to look at


def test_a_torn_round_state_does_not_stop_the_coordinator(tmp_path):
    """A round coordinator over a stub node: its tick runs through, logging the damaged file."""
    from hivemerge.node.coordinators.merge_rounds import RoundCoordinator
    from hivemerge.node.storage.retention import live_work

    logged = []
    node = SimpleNamespace(charter=None, clock=time.time, home=tmp_path, published=lambda: [], log=logged.append, keep_results=None,
                           identity=SimpleNamespace(public_hex="aa" * 32))
    coordinator = RoundCoordinator(node, poll=0.01)
    write_json(tmp_path / "rounds" / f"{'a' * 64}.json", VALID)
    torn_id = "d" * 64
    (tmp_path / "rounds" / f"{torn_id}.json").write_bytes(b'{"proposal": {"round_id": "' + torn_id.encode())
    asyncio.run(coordinator.tick())
    assert logged == [f"skipping the damaged state file {tmp_path / 'rounds' / torn_id}.json "
                      "(JSONDecodeError: Unterminated string starting at: line 1 column 27 (char 26))"]
    # Pruning agrees: no work runs on the damaged file (it does not hold pruning off for
    # ever); what it mentions is still kept (test_store_prune.py)
    assert live_work(tmp_path) is None


def test_a_charter_file_of_another_network_is_set_aside_and_a_malformed_one_names_itself(tmp_path):
    """HOME/charter.json resumes where a node was; one of another network is not taken up,
    and one whose content fails the charter schema stops the start with its path."""
    from hivemerge.node.charter_follower import CharterFollower
    from hivemerge.node.storage.home import CHARTER_FILE
    from hivemerge.protocol import charter as charters
    from hivemerge.protocol.errors import UserInputError
    from hivemerge.protocol.identity import Identity

    def genesis(name: str) -> dict:
        key = Identity.generate()
        return charters.sign_charter(charters.new_charter(name=name, base_ids=["ab" * 32], maintainers=[key.public_hex],
                                                          methods=["ties"], roster={key.public_hex: ["attester"]}), key)

    ours, theirs = genesis("ours"), genesis("theirs")
    node = SimpleNamespace(home=tmp_path, log=print)
    write_json(tmp_path / CHARTER_FILE, [theirs])
    assert CharterFollower(node, ours).chain == [ours]
    write_json(tmp_path / CHARTER_FILE, [{"charter": {"name": "x"}, "signatures": {}}])
    with pytest.raises(UserInputError, match=CHARTER_FILE):
        CharterFollower(node, ours)
