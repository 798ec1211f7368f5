"""What the content store keeps and what `hivemerge store prune` removes.

A home is built by hand: real models, deltas and probe sets in a real store, and the
state files a node writes (published experts and packs, rounds, searches, fusions,
fetched consensus). Each test names exactly which objects must go and which must stay.
"""

from __future__ import annotations

import json
import time
import types
from pathlib import Path

import pytest
from delta_fixtures import assert_user_error, family_shapes, perturbed, random_tensors, save_model, shared_runner

from hivemerge.merge.deltas.delta import extract_delta
from hivemerge.merge.fusion.probe import write_probe
from hivemerge.node.control import COMMANDS, ControlServer
from hivemerge.node.storage.retention import inventory, prune, record_fetched_consensus
from hivemerge.node.storage.store import PACK_SUFFIX, ContentStore
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    return shared_runner(tmp_path_factory)


class Home:
    """A node home with a store of named objects (name -> content id)."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / "home"
        self.store = ContentStore(self.path)
        self.ids: dict[str, str] = {}
        self.shapes = family_shapes()
        self.identity = Identity.generate()
        self.base_tensors = random_tensors(0, self.shapes)
        self.base_dir = save_model(root / "models" / "B", self.base_tensors)
        self.ids["B"] = self.store.add_model(self.base_dir)

    def model(self, name: str, seed: int) -> str:
        self.ids[name] = self.store.add_model(save_model(self.root / "models" / name, random_tensors(seed, self.shapes)))
        return self.ids[name]

    def delta(self, name: str, seed: int) -> str:
        expert = save_model(self.root / "models" / f"expert-{name}", perturbed(self.base_tensors, seed))
        out = self.root / "deltas" / f"{name}.delta.safetensors"
        out.parent.mkdir(exist_ok=True)
        extract_delta(self.base_dir, expert, out, self.identity, "fp16")
        self.ids[name] = self.store.add_delta(out)
        return self.ids[name]

    def probe(self, name: str, text: str) -> str:
        self.ids[name] = self.store.add_probe(write_probe([(text, " answer\n")], self.root / f"{name}.jsonl").path)
        return self.ids[name]

    def pack(self, name: str) -> str:
        """A pack file in the store (pruning reads names, not pack contents)."""
        cid = f"{len(self.ids):064x}"
        self.store.objects.mkdir(parents=True, exist_ok=True)
        (self.store.objects / f"{cid}{PACK_SUFFIX}").write_bytes(b"pack bytes")
        self.store.write_bundle(cid)
        self.ids[name] = cid
        return cid

    def write(self, relative: str, value) -> None:
        path = self.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))

    def names(self, items) -> set[str]:
        by_id = {cid: name for name, cid in self.ids.items()}
        return {by_id[i.cid] for i in items}


def rid(deadline: float) -> str:
    return f"{int(deadline):012x}" + "f" * 52  # its short form: the deadline in hex


def _round(base: str, deadline: float, phase: str, **fields) -> dict:
    return {"proposal": {"round_id": rid(deadline), "base_id": base, "deadline": deadline, "quorum": 1.0,
                         "recipe": {"merge_method": "ties"}}, "phase": phase, **fields}


@pytest.fixture
def home(tmp_path) -> Home:
    h = Home(tmp_path)
    i = h.ids
    for name, seed in (("D_own", 1), ("D_other_old", 2), ("D_other_new", 3), ("D_live", 4), ("D_failed", 5),
                       ("FUSED_new", 6), ("FUSED_ahead", 7), ("D_search", 8), ("D_search_done", 9),
                       ("D_minority", 10), ("D_pending", 11)):
        h.delta(name, seed)
    for name, seed in (("R_old", 20), ("R_new", 21), ("B2", 22), ("C_old", 23), ("C_new", 24), ("R_other_base", 25),
                       ("R_minority", 26), ("R_pending", 27)):
        h.model(name, seed)
    h.probe("PR_pack", "published probe")
    h.probe("PR_replay_old", "replay of an ended round")
    h.pack("P_own")
    h.pack("P_other")

    h.write("published.json", [{"domain": "math", "delta_id": i["D_own"], "base_id": i["B"]}])
    h.write("packs.json", [{"domain": "code", "pack_id": i["P_own"], "probe_id": i["PR_pack"]}])
    # two final rounds on base B: only the newer result is kept by default
    h.write(f"rounds/{rid(100)}.json", _round(i["B"], 100, "attested", result_id=i["R_old"], final=True,
                                              committed=[i["D_own"], i["D_other_old"]]))
    h.write(f"rounds/{rid(200)}.json", _round(
        i["B"], 200, "attested", result_id=i["R_new"], final=True,
        committed=[i["D_own"], i["D_other_new"], i["FUSED_new"]],
        proposal_extra={"replay": f"hm://{i['PR_replay_old']}", "packs": [i["P_other"]]}))
    h.write(f"rounds/{rid(300)}.json", _round(i["B"], 300, "committed", committed=[i["D_live"]]))
    # newer than round 200, but it did not become final with this node's result: not a consensus
    h.write(f"rounds/{rid(250)}.json", _round(i["B"], 250, "attested", result_id=i["R_minority"], final=False,
                                              included=[i["D_minority"]]))
    # attested, finality not known yet: everything it names stays
    h.write(f"rounds/{rid(260)}.json", _round(i["B"], 260, "attested", result_id=i["R_pending"],
                                              included=[i["D_pending"]]))
    h.write(f"rounds/{rid(150)}.json", _round(i["B"], 150, "failed", error="no quorum", committed=[i["D_failed"]]))
    # the fused delta of the ended round 200, adopted from an ahead file; another ahead file not yet proposed
    h.write(f"fusions/{rid(200)}.json", {"phase": "committed", "ahead": True, "delta_id": i["FUSED_new"]})
    h.write("fusions/ahead-k1.json", {"delta_id": i["FUSED_new"], "before": 1.0, "after": 0.5})
    h.write("fusions/ahead-k2.json", {"delta_id": i["FUSED_ahead"], "before": 1.0, "after": 0.5})
    h.write("searches/s1.json", {"proposal": {"round_id": "s1"}, "phase": "searching", "domains": {i["D_search"]: "math"}})
    h.write("searches/s2.json", {"proposal": {"round_id": "s2"}, "phase": "done", "domains": {i["D_search_done"]: "x"}})
    # fetched consensus results of another base (fetch-only use)
    record_fetched_consensus(h.path, i["B2"], i["C_old"], "a" * 64, 50.0)
    record_fetched_consensus(h.path, i["B2"], i["C_new"], "b" * 64, 60.0)
    return h


KEPT = {"B", "D_own", "R_new", "D_live", "FUSED_ahead", "D_search", "B2", "C_new", "P_own", "PR_pack",
        "R_pending", "D_pending"}
REMOVED = {"D_other_old", "D_other_new", "D_failed", "FUSED_new", "D_search_done", "R_old", "C_old",
           "R_other_base", "PR_replay_old", "P_other", "R_minority", "D_minority"}


def test_inventory_says_why_each_object_is_kept(home):
    items = inventory(home.path)
    assert home.names(items) == KEPT | REMOVED  # every stored object, once
    assert home.names(i for i in items if i.kept) == KEPT
    reasons = {home.names([i]).pop(): i.reasons for i in items}
    assert reasons["D_own"] == ["published (math)"]
    assert reasons["B"] == ["published (math)", f"round {260:012x} (attested, not yet known final)",
                            f"round {300:012x} (committed)", f"base of a kept consensus ({home.ids['B'][:12]})"]
    assert reasons["R_pending"] == reasons["D_pending"] == [f"round {260:012x} (attested, not yet known final)"]
    assert reasons["R_new"] == [f"consensus of round {200:012x} (newest 1 for base {home.ids['B'][:12]})"]
    assert reasons["D_live"] == [f"round {300:012x} (committed)"]
    assert reasons["FUSED_ahead"] == ["fusion distilled before proposing"]
    assert reasons["D_search"] == ["search s1 (searching)"]
    assert reasons["C_new"] == [f"consensus of round {'b' * 12} (newest 1 for base {home.ids['B2'][:12]})"]
    assert reasons["P_own"] == reasons["PR_pack"] == ["published pack (code)"]
    assert all(not reasons[n] for n in REMOVED)


def test_keep_more_results_per_base(home):
    kept = home.names(i for i in inventory(home.path, keep=2) if i.kept)
    assert kept == KEPT | {"R_old", "C_old"}
    kept = home.names(i for i in inventory(home.path, keep=0) if i.kept)
    assert kept == KEPT - {"R_new", "C_new", "B2"}  # B stays: the published expert's base


def test_prune_removes_exactly_the_unneeded_objects_and_their_bundles(home):
    store = home.store
    before = {i.cid: i.size for i in inventory(home.path)}
    planned = prune(home.path, dry_run=True)
    assert home.names(planned) == REMOVED
    assert {i.cid: i.size for i in inventory(home.path)} == before  # a dry run changes nothing

    removed = prune(home.path)
    assert home.names(removed) == REMOVED
    assert sum(i.size for i in removed) == sum(before[home.ids[n]] for n in REMOVED)
    for name in REMOVED:
        cid = home.ids[name]
        assert not store.has(cid), name
        assert store.bundle_of(cid) is None, name  # no provider record for what is gone
    for name in KEPT:
        cid = home.ids[name]
        assert store.has(cid) and store.bundle_of(cid) is not None, name
    assert store.model(home.ids["R_new"]).names()  # a kept model is whole
    assert len(store.bundle_ids()) == len(KEPT)
    assert prune(home.path) == []  # nothing left to remove


def test_prune_leaves_interrupted_downloads_and_staging_files(home):
    partial = home.store.partial / "some-bundle" / "model.safetensors"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half")
    staging = home.store.objects / f".{'c' * 64}.delta.safetensors.partial-99"
    staging.write_bytes(b"copying")
    prune(home.path)
    assert partial.read_bytes() == b"half" and staging.read_bytes() == b"copying"


def test_unreadable_state_keeps_everything_it_mentions(home):
    (home.path / "rounds" / f"{rid(100)}.json").write_text("{not json " + home.ids["R_old"])
    kept = home.names(i for i in inventory(home.path) if i.kept)
    assert "R_old" in kept


def test_a_round_whose_final_result_was_fetched_has_ended(home):
    """The fetch-only proposer of the demo attests, fetches the consensus and stops before
    it checks finality: the fetch tells it the round is final."""
    assert "R_pending" in home.names(i for i in inventory(home.path) if i.kept)
    record_fetched_consensus(home.path, home.ids["B"], home.ids["R_pending"], rid(260), 260.0)
    kept = {i.cid: i.reasons for i in inventory(home.path) if i.kept}
    by_id = {cid: name for name, cid in home.ids.items()}
    assert {by_id[c] for c in kept} == KEPT - {"R_new", "D_pending"}  # R_pending is now the newest consensus of B
    assert kept[home.ids["R_pending"]] == [f"consensus of round {260:012x} (newest 1 for base {home.ids['B'][:12]})"]


def test_a_missing_home_is_an_error(tmp_path):
    with pytest.raises(UserInputError, match="no such node home"):
        inventory(tmp_path / "typo")


def test_corrupt_publication_list_is_refused(home):
    (home.path / "published.json").write_text("[{")
    with pytest.raises(UserInputError, match="published.json: not valid JSON"):
        prune(home.path)
    assert home.store.has(home.ids["D_other_old"])


def test_fetched_consensus_record_replaces_an_earlier_entry(tmp_path):
    record_fetched_consensus(tmp_path, "b" * 64, "r" * 64, "x" * 64, 1.0)
    record_fetched_consensus(tmp_path, "b" * 64, "r" * 64, "x" * 64, 1.0)
    assert json.loads((tmp_path / "consensus.json").read_text()) == [
        {"base_id": "b" * 64, "result_id": "r" * 64, "round_id": "x" * 64, "deadline": 1.0}]


# -- the command line -------------------------------------------------------------------
def test_cli_list_and_prune(cli, home):
    listed = cli("store", "list", "--home", str(home.path), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["id"]: r for r in json.loads(listed.stdout)}
    assert {n for n, cid in home.ids.items() if rows[cid]["kept"]} == KEPT
    assert rows[home.ids["D_own"]]["reasons"] == ["published (math)"]

    human = cli("store", "list", "--home", str(home.path))
    assert human.returncode == 0 and "removable" in human.stdout and home.ids["R_old"][:12] in human.stdout

    dry = cli("store", "prune", "--home", str(home.path), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] and {r["id"] for r in report["removed"]} == {home.ids[n] for n in REMOVED}
    assert home.store.has(home.ids["R_old"])

    done = cli("store", "prune", "--home", str(home.path), "--keep", "2")
    assert done.returncode == 0, done.stderr
    assert f"removed {len(REMOVED) - 2} object(s)" in done.stderr
    assert home.store.has(home.ids["R_old"]) and not home.store.has(home.ids["D_failed"])


def test_cli_refuses_to_prune_under_a_running_node(cli, home):
    fake_node = types.SimpleNamespace(**{name: (lambda **args: {}) for name in COMMANDS})
    server = ControlServer(home.path, fake_node)
    try:
        result = cli("store", "prune", "--home", str(home.path))
        assert_user_error(result, "a node is running on", "stop it first")
        assert home.store.has(home.ids["D_failed"])  # nothing removed
        dry = cli("store", "prune", "--home", str(home.path), "--dry-run")  # looking is fine
        assert dry.returncode == 0 and f"would remove {len(REMOVED)} object(s)" in dry.stderr
    finally:
        server.close()


def test_cli_bad_keep_is_a_usage_error(cli, home):
    result = cli("store", "prune", "--home", str(home.path), "--keep", "-1")
    assert result.returncode == 2 and "Traceback" not in result.stderr


# -- pruning inside a running node (node start --keep-results) ------------------------------
def _pruning_coordinator(home: Home, keep: int = 1):
    import threading

    from hivemerge.node.coordinators.merge_rounds import RoundCoordinator

    logged: list[str] = []
    node = types.SimpleNamespace(charter=None, clock=time.time, home=home.path, published=lambda: [], log=logged.append, keep_results=keep,
                                 content_lock=threading.Lock(), identity=types.SimpleNamespace(public_hex="aa" * 32))
    return RoundCoordinator(node, poll=0.01), logged


def _end_everything(home: Home) -> None:
    """The fixture's round 300 fails, round 260 settles not final, search s1 finishes."""
    i = home.ids
    home.write(f"rounds/{rid(300)}.json", _round(i["B"], 300, "failed", error="no quorum", committed=[i["D_live"]]))
    home.write(f"rounds/{rid(260)}.json", _round(i["B"], 260, "attested", result_id=i["R_pending"], final=False,
                                                 included=[i["D_pending"]]))
    home.write("searches/s1.json", {"proposal": {"round_id": "s1"}, "phase": "done", "domains": {i["D_search"]: "math"}})


def test_live_work_names_what_is_under_way(home):
    from hivemerge.node.storage.retention import live_work

    assert live_work(home.path) == f"round {260:012x} is attested"  # finality not known yet
    _end_everything(home)
    assert live_work(home.path) is None
    home.write(f"fusions/{rid(400)}.json", {"phase": "fusing", "started": 1.0})
    assert live_work(home.path) == f"fusion {rid(400)[:18]} is distilling"


def test_a_running_node_prunes_only_when_idle_and_unlocked(home):
    import asyncio

    coordinator, logged = _pruning_coordinator(home)
    asyncio.run(coordinator.auto_prune())  # a round is under way: nothing goes
    assert logged == [f"store: not pruned now: round {260:012x} is attested"]
    assert home.store.has(home.ids["D_failed"])

    _end_everything(home)
    coordinator.node.content_lock.acquire()  # a command (fetch, publish, propose) is adding content
    try:
        asyncio.run(coordinator.auto_prune())
    finally:
        coordinator.node.content_lock.release()
    assert logged[-1] == "store: not pruned now: a command is adding content"
    assert home.store.has(home.ids["D_failed"])

    asyncio.run(coordinator.auto_prune())
    gone = REMOVED | {"D_live", "D_search", "R_pending", "D_pending"}  # what the ended work named
    assert {n for n, cid in home.ids.items() if not home.store.has(cid)} == gone
    assert logged[-1].startswith(f"store: pruned {len(gone)} object(s), ")


def test_the_end_of_a_round_triggers_pruning_in_a_node_that_keeps_results(home):
    """tick -> settle learns round 260 is final with this node's result -> auto_prune."""
    import asyncio

    i = home.ids
    _end_everything(home)
    home.write(f"rounds/{rid(260)}.json", _round(i["B"], 260, "attested", result_id=i["R_pending"],
                                                 included=[i["D_pending"]]))
    coordinator, logged = _pruning_coordinator(home)

    async def round_records(round_id, deadline):
        return {"a": {"delta_ids": []}}, {"a": {"result_id": i["R_pending"]}}

    coordinator.round_records = round_records
    proposals_asked = []

    async def proposals(base_id):
        proposals_asked.append(base_id)
        return []

    coordinator.proposals = proposals
    asyncio.run(coordinator.tick())
    assert coordinator.state(rid(260))["final"] is True
    # R_pending is now the newest consensus of B; R_new and everything ended work named are gone
    gone = REMOVED | {"D_live", "D_search", "D_pending", "R_new"}
    assert {n for n, cid in i.items() if not home.store.has(cid)} == gone
    assert len(logged) == 1 and logged[0].startswith(f"store: pruned {len(gone)} object(s), "), logged
