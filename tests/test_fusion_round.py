"""Merge rounds with a fusion step, among real nodes on 127.0.0.1.

A heterogeneous expert (GPT-2, its own tokenizer) publishes a logit pack and the probe
set; two homogeneous experts publish deltas of the pivot (a tiny Llama). The proposer,
the designated fuser, distils the pack into the pivot, publishes the fused delta and
its fusion record, and commits it; every participant recomputes the probe losses.

- honest fuser, with a replay set (a file the proposer stores and serves): the fused
  delta joins the merge, every node attests the same result, which is the offline merge
  of the three deltas and not the merge of the two; ``round status`` shows the fusion;
- a fuser whose record lies about the fused model's probe loss, or names another replay
  set than the proposal: the fused delta is excluded at every node with the reason, and
  the result is the merge of the two;
- ``pivot: merge``: the fuser distils into the weight merge of the two deltas the
  proposal pinned, and every node attests the base plus the fused delta alone, whose
  record's "before" figures are the weight merge's;
- the proposer, its own fuser, distils before it proposes: a distillation longer than
  the whole commitment window still joins; a short-lived client cannot be the fuser.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from fuse_fixtures import shared_hetero
from network_fixtures import wait_until
from round_fixtures import RoundNet, offline_merge, wait_round_done
from safetensors.torch import load_file, save_file

from hivemerge.protocol import fusion, rounds
from hivemerge.protocol.errors import UserInputError

TEMPLATE = {"merge_method": "task_arithmetic", "parameters": {"weight": 1.0}}
FUSION = {"packs": {"domains": ["rotate"]}, "lambda": 0.0, "steps": 20, "lr": 3e-3, "batch": 16, "codec": "int8"}
DEADLINE = 12  # seconds for the experts to commit: the proposer is the fuser and distils before it proposes


def perturbed(base: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """A stand-in for a fine-tune of ``base``: every weight moved by seeded noise."""
    shutil.copytree(base, out)
    weights = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    moved = {k: (v + scale * torch.randn(v.shape, generator=gen)).to(v.dtype).contiguous() for k, v in weights.items()}
    save_file(moved, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hetero = shared_hetero(tmp_path_factory)
    root = tmp_path_factory.mktemp("fusion-round")
    return hetero, {"add": perturbed(hetero.pivot, root / "add", 1), "sub": perturbed(hetero.pivot, root / "sub", 2)}


@pytest.fixture
def net(tmp_path):
    pool = RoundNet(tmp_path / "nodes")
    yield pool
    pool.close_all()


def write_replay(path: Path):
    """A replay set: prompts of another domain, held to the pivot's own distribution."""
    from hivemerge.merge.fusion.probe import write_probe

    return write_probe([(f"max {a} {b}=", f"{max(a, b)}\n") for a, b in [(3, 7), (12, 5), (40, 41), (9, 90)] * 8], path)


def start(net, setup, replay=None, **fusion_settings):
    """a: proposer and fuser (no expert); m, s: homogeneous experts; h: the pack's publisher.
    ``replay``: a replay file the proposer names in the fusion block; ``fusion_settings``:
    more keys of the block."""
    hetero, experts = setup
    a, m, s, h = net.start_many(["a", "m", "s", "h"])
    published = {dom: node.publish(experts[dom], dom, hetero.pivot) for dom, node in (("add", m), ("sub", s))}
    pack = h.publish_pack(str(hetero.pack), str(hetero.probe.path), "rotate")
    assert pack["probe_id"] == hetero.probe.id and pack["domain"] == "rotate"
    listed = a.packs("rotate")
    assert [r["pack_id"] for r in listed] == [pack["pack_id"]] and listed[0]["publisher"] == h.identity.public_hex
    document = {**TEMPLATE, "base_model": str(hetero.pivot), "select": {"domains": ["add", "sub"]}, "deadline": DEADLINE,
                "fusion": {**FUSION, **({"replay": str(replay.path)} if replay else {}), **fusion_settings}}
    proposal = a.propose(document)
    block = proposal["recipe"]["fusion"]
    assert block["packs"] == {"ids": [pack["pack_id"]]} and block["probe"] == hetero.probe.id
    assert block["replay"] == (replay.id if replay else None)
    if replay:  # stored in canonical form under its id, and served from there
        assert a.store.resolve(replay.id).read_bytes() == replay.path.read_bytes()
    assert block["fuser"] == a.identity.public_hex and block["steps"] == 20 and block["method"] == "mince"
    return (a, m, s), published, proposal


def wait_fused(fuser, proposal) -> dict:
    """The fuser's fusion state once it committed its fused delta (or failed: the test fails here, not later)."""
    def done():
        state = fuser.rounds.fusion.state(proposal["round_id"])
        return state if state and state["phase"] in ("committed", "failed") else None

    state = wait_until(done, DEADLINE + 30, what="the fuser to commit its fused delta")
    assert state["phase"] == "committed", state.get("error")
    return state


def delta_files(node, ids) -> dict[str, Path]:
    return {d: node.store.resolve(d) for d in ids}


def test_the_fused_delta_joins_the_merge_and_every_node_attests_the_same_result(net, setup, tmp_path):
    from hivemerge.node.cli.round import fusion_rows

    replay = write_replay(tmp_path / "replay.jsonl")
    (a, m, s), published, proposal = start(net, setup, replay)
    rid = proposal["round_id"]
    fused_state = wait_fused(a, proposal)
    states = wait_round_done([a, m, s], rid, timeout=DEADLINE + 90)
    fused_id = fused_state["delta_id"]
    homogeneous = sorted(p["delta_id"] for p in published.values())
    for state in states:
        assert state["phase"] == "attested", state.get("error")
        assert state["excluded"] == {}
        assert state["included"] == sorted(homogeneous + [fused_id])
    assert len({st["result_id"] for st in states}) == 1
    result_id = states[0]["result_id"]

    # the fusion record, as every node reads it: the fused model is better on the probe
    found = m.run(m.network.get_records(rounds.round_key(rid)), 30)
    record = next(r for r in found.values() if "before" in r)
    assert record["publisher"] == a.identity.public_hex and record["delta_id"] == fused_id
    assert record["packs"] == proposal["recipe"]["fusion"]["packs"]["ids"] and record["probe_id"] == setup[0].probe.id
    assert record["after"]["fused"] < record["before"]["fused"] - 0.05
    # held on the replay set: the fused model drifted there by less than the default max_drift
    assert record["replay_id"] == replay.id
    assert fusion.replay_drift(record["before"], record["after"]) < fusion.DEFAULTS["max_drift"]
    commitment = next(r for r in found.values() if r.get("delta_ids") and r["publisher"] == a.identity.public_hex)
    assert commitment["domains"] == {fused_id: fusion.FUSED_DOMAIN}

    # the same merge offline, with and without the fused delta
    hetero = setup[0]
    with_fused = offline_merge(tmp_path / "three", hetero.pivot, delta_files(a, homogeneous + [fused_id]), TEMPLATE)
    without = offline_merge(tmp_path / "two", hetero.pivot, delta_files(a, homogeneous), TEMPLATE)
    assert result_id == with_fused != without
    row = next(r for r in m.round_status() if r["proposal"]["round_id"] == rid)
    assert row["final"] and row["final_result"] == result_id and len(row["attesters"]) == 3
    # round status shows the fusion step: fuser, fused delta, verdict (every attester kept it)
    shown = row["fusion"]
    assert shown["fuser"] == a.identity.public_hex and shown["delta_id"] == fused_id and shown["replay_id"] == replay.id
    assert shown["verdict"] == "kept" and set(shown["verdicts"]) == set(row["attesters"])
    assert shown["record"]["after"] == record["after"]
    assert fusion_rows([row]) == [(rid[:12], a.identity.public_hex[:12], fused_id[:12], replay.id[:12], "kept")]


def test_a_fusion_into_the_weight_merge_replaces_it_with_the_base_plus_the_fused_delta(net, setup, tmp_path):
    from hivemerge.merge.fusion.check import measure_fused
    from hivemerge.merge.fusion.packs import PackFile

    (a, m, s), published, proposal = start(net, setup, pivot="merge")
    block = proposal["recipe"]["fusion"]
    pinned = {p["delta_id"]: domain for domain, p in published.items()}
    assert block["pivot"] == "merge" and block["pivot_deltas"] == pinned  # fixed when proposed
    rid = proposal["round_id"]
    fused_id = wait_fused(a, proposal)["delta_id"]
    states = wait_round_done([a, m, s], rid, timeout=DEADLINE + 90)
    for state in states:
        assert state["phase"] == "attested", state.get("error")
        assert state["excluded"] == {}
        assert state["included"] == sorted([*pinned, fused_id])
    assert len({st["result_id"] for st in states}) == 1

    hetero = setup[0]
    fused_only = offline_merge(tmp_path / "fused-only", hetero.pivot, delta_files(a, [fused_id]), TEMPLATE)
    weight_merge = offline_merge(tmp_path / "weight-merge", hetero.pivot, delta_files(a, pinned), TEMPLATE)
    assert states[0]["result_id"] == fused_only != weight_merge

    # the record's "before" figures are the weight merge's (the pivot), not the base's
    found = m.run(m.network.get_records(rounds.round_key(rid)), 30)
    record = next(r for r in found.values() if "before" in r)
    packs, delta = [PackFile(hetero.pack)], a.store.resolve(fused_id)
    on_merge, after = measure_fused(hetero.pivot, delta, packs, hetero.probe, block, tmp_path / "m1", pivot_dir=tmp_path / "weight-merge")
    on_base, _ = measure_fused(hetero.pivot, delta, packs, hetero.probe, block, tmp_path / "m2")
    for name in fusion.FIGURES:
        assert abs(record["before"][name] - on_merge[name]) <= block["tolerance"]
        assert abs(record["after"][name] - after[name]) <= block["tolerance"]
    assert abs(on_base["fused"] - on_merge["fused"]) > 10 * block["tolerance"]  # the pivot is not the base
    assert record["after"]["fused"] < record["before"]["fused"] - 0.05


def test_a_proposing_fuser_distils_first_so_a_distillation_longer_than_the_window_still_joins(net, setup, tmp_path, monkeypatch):
    """The proposer is its own fuser: it distils before it proposes, so the commitment
    window need not cover the distillation. Here the distillation takes longer than the
    whole window; the fused delta is still committed at once and kept by every node."""
    from hivemerge.merge.fusion import check as fusion_check

    real = fusion_check.run_fusion

    def slow(*args, **kwargs):
        time.sleep(DEADLINE + 2)
        return real(*args, **kwargs)

    monkeypatch.setattr(fusion_check, "run_fusion", slow)
    asked = time.time()
    (a, m, s), published, proposal = start(net, setup, pivot="merge")
    assert proposal["deadline"] >= asked + 2 * DEADLINE + 2  # proposed only once the distillation was done
    state = wait_fused(a, proposal)
    assert state["ahead"] is True and state["seconds"] >= DEADLINE + 2
    found = m.run(m.network.get_records(rounds.round_key(proposal["round_id"])), 30)
    commitment = next(r for r in found.values() if r.get("delta_ids") and r["publisher"] == a.identity.public_hex)
    assert commitment["delta_ids"] == [state["delta_id"]] and commitment["issued_at"] < proposal["deadline"] - DEADLINE / 2
    states = wait_round_done([a, m, s], proposal["round_id"], timeout=DEADLINE + 90)
    pinned = sorted(p["delta_id"] for p in published.values())
    for st in states:
        assert st["phase"] == "attested", st.get("error")
        assert st["excluded"] == {}
        assert st["included"] == sorted([*pinned, state["delta_id"]])
    fused_only = offline_merge(tmp_path / "fused-only", setup[0].pivot, delta_files(a, [state["delta_id"]]), TEMPLATE)
    assert {st["result_id"] for st in states} == {fused_only}


def test_a_short_lived_client_cannot_be_the_fuser(net, setup):
    hetero, experts = setup
    a, h = net.start_many(["a", "h"])
    h.publish_pack(str(hetero.pack), str(hetero.probe.path), "rotate")
    client = net.start("client", peers=a.maddrs(), client_mode=True)
    document = {**TEMPLATE, "base_model": str(hetero.pivot), "select": {"domains": ["add"]}, "deadline": DEADLINE, "fusion": FUSION}
    with pytest.raises(UserInputError, match="would be the round's fuser, which must keep serving the fused delta"):
        client.propose(document)
    assert not (client.home / "fusions").is_dir() or not any((client.home / "fusions").glob("ahead-*"))  # nothing distilled


def test_an_expert_joining_after_the_proposal_voids_the_fusion_into_the_weight_merge(net, setup, tmp_path):
    """A third expert published after the proposal commits too: the round's merge is then
    not the one the fused delta was distilled into, so every node excludes the fused
    delta with the reason and attests the plain weight merge of all three experts."""
    (a, m, s), published, proposal = start(net, setup, pivot="merge")
    hetero = setup[0]
    late = net.start("late", peers=a.maddrs())
    joined = late.publish(perturbed(hetero.pivot, tmp_path / "late-expert", 3), "add", hetero.pivot)["delta_id"]
    assert joined not in proposal["recipe"]["fusion"]["pivot_deltas"]
    rid = proposal["round_id"]
    fused_id = wait_fused(a, proposal)["delta_id"]
    states = wait_round_done([a, m, s, late], rid, timeout=DEADLINE + 90)
    experts = sorted([*(p["delta_id"] for p in published.values()), joined])
    reason = f"fusion: this round includes delta {joined[:12]}, which the pivot does not merge"
    for state in states:
        assert state["phase"] == "attested", state.get("error")
        assert state["excluded"] == {fused_id: reason}
        assert state["included"] == experts
    assert {st["result_id"] for st in states} == {offline_merge(tmp_path / "three", hetero.pivot, delta_files(a, experts), TEMPLATE)}


def test_a_fuser_that_misreports_its_probe_loss_is_excluded_with_the_reason(net, setup, tmp_path):
    (a, m, s), published, proposal = start(net, setup)
    rid = proposal["round_id"]
    state = wait_fused(a, proposal)
    # The fuser restates its record: the fused model claimed better on the probe than it is.
    found = a.run(a.network.get_records(rounds.round_key(rid)), 30)
    honest = next(r for r in found.values() if "before" in r)
    lie = {k: v for k, v in honest.items() if k != "publisher"}
    lie["after"] = {**honest["after"], "lm": honest["after"]["lm"] - 0.25}
    lie["issued_at"] = time.time()
    assert time.time() < proposal["deadline"], "the fuser finished too late for the test to restate its record"
    assert a.run(a.store_record("record/fusion", rounds.round_key(rid), lie, a.rounds.ttl(proposal) + 60), 30)

    states = wait_round_done([a, m, s], rid, timeout=DEADLINE + 90)
    fused_id = state["delta_id"]
    homogeneous = sorted(p["delta_id"] for p in published.values())
    want = (f"fusion: reported fused model probe loss lm={lie['after']['lm']:.6g} differs from the recomputed "
            f"{honest['after']['lm']:.6g} (tolerance 0.001)")
    for st in states:
        assert st["phase"] == "attested", st.get("error")
        assert st["excluded"] == {fused_id: want}
        assert st["included"] == homogeneous
    assert len({st["result_id"] for st in states}) == 1
    hetero = setup[0]
    assert states[0]["result_id"] == offline_merge(tmp_path / "two", hetero.pivot, delta_files(a, homogeneous), TEMPLATE)


def test_a_fuser_whose_record_names_another_replay_set_is_excluded_with_the_reason(net, setup, tmp_path):
    replay = write_replay(tmp_path / "replay.jsonl")
    (a, m, s), published, proposal = start(net, setup, replay)
    rid = proposal["round_id"]
    state = wait_fused(a, proposal)
    # The fuser restates its record: the same delta and figures, but another replay set named.
    found = a.run(a.network.get_records(rounds.round_key(rid)), 30)
    honest = next(r for r in found.values() if "before" in r)
    assert honest["replay_id"] == replay.id
    other = setup[0].other_probe.id
    lie = {**{k: v for k, v in honest.items() if k != "publisher"}, "replay_id": other, "issued_at": time.time()}
    assert time.time() < proposal["deadline"], "the fuser finished too late for the test to restate its record"
    assert a.run(a.store_record("record/fusion", rounds.round_key(rid), lie, a.rounds.ttl(proposal) + 60), 30)

    states = wait_round_done([a, m, s], rid, timeout=DEADLINE + 90)
    fused_id = state["delta_id"]
    homogeneous = sorted(p["delta_id"] for p in published.values())
    want = f"fusion: the fusion record names replay set {other[:12]}, not the proposal's ({replay.id[:12]})"
    for st in states:
        assert st["phase"] == "attested", st.get("error")
        assert st["excluded"] == {fused_id: want}
        assert st["included"] == homogeneous
    assert len({st["result_id"] for st in states}) == 1
    row = next(r for r in s.round_status() if r["proposal"]["round_id"] == rid)
    assert row["fusion"]["verdict"] == f"excluded: {want}" and row["fusion"]["delta_id"] == fused_id


def test_a_fusion_check_that_crashes_excludes_the_fused_delta_instead_of_failing_the_round(net, setup, tmp_path, monkeypatch):
    """Inputs that pass verification but break the measurement (here: every participant's
    measurement raises RuntimeError) are not trusted and not fatal: each node excludes the
    fused delta with the reason, and the round ends on the merge of the others."""
    (a, m, s), published, proposal = start(net, setup)
    rid = proposal["round_id"]
    state = wait_fused(a, proposal)  # the fuser has distilled and committed; now the checks break

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (7x64 and 32x64)")

    monkeypatch.setattr("hivemerge.merge.fusion.check.measure_fused", broken)
    states = wait_round_done([a, m, s], rid, timeout=DEADLINE + 90)
    want = "fusion: the probe losses could not be measured: RuntimeError: mat1 and mat2 shapes cannot be multiplied (7x64 and 32x64)"
    homogeneous = sorted(p["delta_id"] for p in published.values())
    for st in states:
        assert st["phase"] == "attested", st.get("error")
        assert st["excluded"] == {state["delta_id"]: want}
        assert st["included"] == homogeneous
    assert len({st["result_id"] for st in states}) == 1
    assert states[0]["result_id"] == offline_merge(tmp_path / "two", setup[0].pivot, delta_files(a, homogeneous), TEMPLATE)


def test_pack_publish_and_list_through_the_cli(net, setup, tmp_path, tmp_path_factory):
    from delta_fixtures import assert_user_error, shared_runner

    hetero = setup[0]
    cli = shared_runner(tmp_path_factory)
    assert_user_error(cli("pack", "publish", hetero.pack, "--probe", hetero.probe.path, "--domain", "rotate",
                          "--home", tmp_path / "nobody"), "no node is running")
    h = net.start("h")
    with pytest.raises(Exception, match="reserved for fused deltas"):
        h.publish_pack(str(hetero.pack), str(hetero.probe.path), fusion.FUSED_DOMAIN)
    with pytest.raises(Exception, match="made for probe set"):
        h.publish_pack(str(hetero.pack), str(hetero.other_probe.path), "rotate")
    record = h.publish_pack(str(hetero.pack), str(hetero.probe.path), "rotate")
    (row,) = cli("pack", "list", "--json", "--peer", h.maddrs()[0], "--home", tmp_path / "client").json()
    assert row["pack_id"] == record["pack_id"] and row["probe_id"] == hetero.probe.id
    assert row["publisher"] == h.identity.public_hex and row["size"] == hetero.pack.stat().st_size
    # the probe set is served in canonical form under its id; the pack under its own
    assert h.store.resolve(hetero.probe.id).read_bytes() == hetero.probe.path.read_bytes()
    assert h.store.resolve(record["pack_id"]).read_bytes() == hetero.pack.read_bytes()
    # `hivemerge experts` lists packs too, with their kind
    (listed,) = cli("experts", "--json", "--peer", h.maddrs()[0], "--home", tmp_path / "client").json()
    assert listed["kind"] == "pack" and listed["pack_id"] == record["pack_id"]
    table = cli("experts", "--peer", h.maddrs()[0], "--home", tmp_path / "client")
    assert table.returncode == 0 and "0 expert(s), 1 pack(s)" in table.stdout and "rotate" in table.stdout
