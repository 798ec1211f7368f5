"""The fusion step's pure rules (protocol/fusion.py) and its two DHT records (protocol/records.py)."""

from __future__ import annotations

import hashlib
import time

import pytest

from hivemerge.protocol import fusion
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.records import PACKS_KEY, is_valid_signed_value, make_record, open_record
from hivemerge.protocol.rounds import round_key

ALICE, BOB = Identity.generate(), Identity.generate()
PACK, PROBE, MODEL, BUNDLE, ROUND, DELTA, REPLAY = (hashlib.sha256(n.encode()).hexdigest() for n in "pqmbrdy")
PEER = "12D3KooWCHTsmnFqzECtNepaJp3WordvsVhcq7pgtp1MAY3SUHua"


def pack_fields(**changes) -> dict:
    fields = {"domain": "rotate", "pack_id": PACK, "probe_id": PROBE, "model_id": MODEL, "top_k": 8, "bundle_id": BUNDLE,
              "probe_bundle_id": BUNDLE, "size": 4096, "peer_id": PEER, "maddrs": [], "issued_at": 1700000000.0,
              "expires_at": 1700000300.0}
    return {**fields, **changes}


def fusion_fields(**changes) -> dict:
    fields = {"round_id": ROUND, "delta_id": DELTA, "packs": [PACK], "probe_id": PROBE, "replay_id": None,
              "before": {"lm": 3.5, "fused": 3.25}, "after": {"lm": 2.0, "fused": 1.5}, "peer_id": PEER, "maddrs": [],
              "issued_at": 1700000000.0, "expires_at": 1700000300.0}
    return {**fields, **changes}


def block(**changes) -> dict:
    return fusion.check_fusion_block({"packs": {"ids": [PACK]}, "probe": PROBE, "fuser": ALICE.public_hex, **changes},
                                     resolved=True)


def test_pack_and_fusion_records_open_under_their_keys():
    value = make_record(ALICE, "record/pack", pack_fields())
    opened = open_record(PACKS_KEY, f"{ALICE.public_hex}/{PACK}", value)
    assert opened["pack_id"] == PACK and opened["publisher"] == ALICE.public_hex
    value = make_record(ALICE, "record/fusion", fusion_fields())
    opened = open_record(round_key(ROUND), f"{ALICE.public_hex}/fusion", value)
    assert opened["after"] == {"lm": 2.0, "fused": 1.5} and opened["publisher"] == ALICE.public_hex


def test_pack_and_fusion_records_under_other_subkeys_keys_or_signers_are_refused():
    pack = make_record(ALICE, "record/pack", pack_fields())
    assert not is_valid_signed_value(ALICE.public_hex, pack)  # no pack id in the subkey
    assert not is_valid_signed_value(f"{BOB.public_hex}/{PACK}", pack)  # signed by another key
    record = make_record(ALICE, "record/fusion", fusion_fields())
    with pytest.raises(UserInputError):
        open_record(round_key(DELTA), f"{ALICE.public_hex}/fusion", record)  # another round's key
    with pytest.raises(UserInputError):
        open_record(round_key(ROUND), f"{ALICE.public_hex}/commit", record)  # read as a commitment


@pytest.mark.parametrize("kind,fields", [
    ("record/fusion", fusion_fields(after={"lm": float("nan"), "fused": 1.0})),
    ("record/fusion", fusion_fields(before={"lm": 1.0})),
    ("record/fusion", fusion_fields(packs=[])),
    ("record/fusion", fusion_fields(packs=["not an id"])),
    ("record/fusion", fusion_fields(replay_id="not an id")),
    ("record/fusion", fusion_fields(replay_id=REPLAY)),  # a replay set named, but no replay figures
    ("record/fusion", fusion_fields(before={"lm": 1.0, "fused": 1.0, "replay": 1.0})),  # replay figures, no replay set
    ("record/fusion", fusion_fields(replay_id=REPLAY, before={"lm": 1.0, "fused": 1.0, "replay": float("inf")},
                                    after={"lm": 1.0, "fused": 1.0, "replay": 1.0})),
    ("record/pack", pack_fields(top_k=0)),
    ("record/pack", pack_fields(probe_id="x" * 64)),
])
def test_malformed_pack_and_fusion_records_are_refused(kind, fields):
    with pytest.raises(UserInputError):
        make_record(ALICE, kind, fields)


def test_a_block_is_filled_with_defaults_and_every_bad_value_is_named():
    full = block()
    assert full["method"] == "mince" and full["lambda"] == 0.5 and full["steps"] == 300 and full["tolerance"] == 1e-3
    assert (full["lr"], full["batch"], full["seed"], full["replay_share"]) == (5e-4, 48, 0, 0.5)  # protocol/fusion.DISTILLATION
    assert fusion.check_fusion_block({"packs": {"domains": ["rotate"]}})["packs"] == {"domains": ["rotate"]}
    for bad, key in [({"lambda": 1.5}, "fusion.lambda"), ({"steps": 0}, "fusion.steps"), ({"lr": 0}, "fusion.lr"),
                     ({"method": "max"}, "fusion.method"), ({"batch": True}, "fusion.batch"), ({"probe": "abc"}, "fusion.probe"),
                     ({"fuser": "abc"}, "fusion.fuser"), ({"replay": 1}, "fusion.replay"), ({"packs": {}}, "fusion.packs")]:
        with pytest.raises(UserInputError, match=key.replace(".", r"\.")):
            block(**bad)
    with pytest.raises(UserInputError, match="by id"):
        fusion.check_fusion_block({"packs": {"domains": ["rotate"]}, "probe": PROBE, "fuser": ALICE.public_hex}, resolved=True)


def test_a_replay_set_is_named_by_id_in_a_proposal_and_by_file_or_id_in_a_recipe():
    assert block()["replay"] is None and block()["replay_share"] == 0.5 and block()["max_drift"] == 0.1
    assert block(replay=f"hm://{REPLAY}")["replay"] == REPLAY
    written = fusion.check_fusion_block({"packs": {"domains": ["rotate"]}, "replay": "replay.jsonl", "max_drift": 0.2})
    assert written["replay"] == "replay.jsonl" and written["max_drift"] == 0.2
    assert "replay" not in fusion.check_fusion_block({"packs": {"domains": ["rotate"]}})
    for bad, key in [({"replay": "replay.jsonl"}, "fusion.replay"), ({"replay": ""}, "fusion.replay"),
                     ({"replay_share": 1.0}, "fusion.replay_share"), ({"replay_share": -0.1}, "fusion.replay_share"),
                     ({"max_drift": 0}, "fusion.max_drift"), ({"max_drift": float("nan")}, "fusion.max_drift")]:
        with pytest.raises(UserInputError, match=key.replace(".", r"\.") + ":"):
            block(**bad)


def test_a_record_with_a_replay_set_opens_with_its_figures():
    fields = fusion_fields(replay_id=REPLAY, before={"lm": 3.5, "fused": 3.25, "replay": 1.0},
                           after={"lm": 2.0, "fused": 1.5, "replay": 1.02})
    opened = open_record(round_key(ROUND), f"{ALICE.public_hex}/fusion", make_record(ALICE, "record/fusion", fields))
    assert opened["replay_id"] == REPLAY and fusion.replay_drift(opened["before"], opened["after"]) == pytest.approx(0.02)


def test_judge_with_a_replay_set_checks_the_replay_figure_and_the_drift():
    b = block(**{"lambda": 0.5, "tolerance": 0.01, "replay": REPLAY, "max_drift": 0.1})
    before, after = {"lm": 3.5, "fused": 3.25, "replay": 1.0}, {"lm": 2.0, "fused": 1.5, "replay": 1.08}
    record = fusion_fields(replay_id=REPLAY, before=before, after=after)
    assert fusion.judge(b, record, before, {**after, "replay": 1.085}) is None  # drift 0.085, within 0.1
    assert fusion.judge(b, record, before, {**after, "replay": 1.2}) == (
        "fusion: reported fused model probe loss replay=1.08 differs from the recomputed 1.2 (tolerance 0.01)")
    drifted = fusion_fields(replay_id=REPLAY, before=before, after={**after, "replay": 1.125})
    assert fusion.judge(b, drifted, before, {**after, "replay": 1.125}) == (
        "fusion: drift on the replay set 0.125 exceeds max_drift 0.1 (replay loss 1 (base) -> 1.125 (fused))")
    # no improvement on the probe is named first; without a replay set the drift is not judged
    worse = {"lm": 3.5, "fused": 3.5, "replay": 2.0}
    assert fusion.judge(b, fusion_fields(replay_id=REPLAY, before=before, after=worse), before, worse).startswith(
        "fusion: no improvement on the probe")
    plain = block(**{"lambda": 0.5, "tolerance": 0.01})
    assert fusion.judge(plain, fusion_fields(), {"lm": 3.5, "fused": 3.25}, {"lm": 2.0, "fused": 1.5}) is None


def test_record_reason_checks_the_replay_set_the_proposal_named():
    b = block(replay=REPLAY)
    record = {**fusion_fields(replay_id=REPLAY), "publisher": ALICE.public_hex}
    assert fusion.record_reason(b, ALICE.public_hex, DELTA, record) is None
    assert fusion.record_reason(b, ALICE.public_hex, DELTA, {**record, "replay_id": PROBE}) == (
        f"fusion: the fusion record names replay set {PROBE[:12]}, not the proposal's ({REPLAY[:12]})")
    assert fusion.record_reason(b, ALICE.public_hex, DELTA, {**record, "replay_id": None}) == (
        f"fusion: the fusion record names no replay set, not the proposal's ({REPLAY[:12]})")
    assert fusion.record_reason(block(), ALICE.public_hex, DELTA, record) == (
        f"fusion: the fusion record names replay set {REPLAY[:12]}, not the proposal's (none)")


def test_judge_keeps_an_honest_improvement_and_names_every_other_verdict():
    b = block(**{"lambda": 0.5, "tolerance": 0.01})
    record = fusion_fields()
    assert fusion.judge(b, record, {"lm": 3.5, "fused": 3.25}, {"lm": 2.005, "fused": 1.5}) is None
    assert fusion.judge(b, record, {"lm": 3.5, "fused": 3.25}, {"lm": 2.5, "fused": 1.5}) == (
        "fusion: reported fused model probe loss lm=2 differs from the recomputed 2.5 (tolerance 0.01)")
    assert fusion.judge(b, record, {"lm": 3.5, "fused": 3.3}, {"lm": 2.0, "fused": 1.5}).startswith(
        "fusion: reported base probe loss fused=3.25")
    worse = fusion_fields(after={"lm": 3.5, "fused": 3.5})  # probe loss 3.375 -> 3.5
    assert fusion.judge(b, worse, {"lm": 3.5, "fused": 3.25}, {"lm": 3.5, "fused": 3.5}) == (
        "fusion: no improvement on the probe: probe loss 3.375 (base) -> 3.5 (fused)")
    assert fusion.probe_loss({"lm": 2.0, "fused": 1.0}, 0.25) == pytest.approx(1.25)


def test_record_reason_checks_the_fuser_the_delta_and_the_inputs():
    b = block()
    record = {**fusion_fields(), "publisher": ALICE.public_hex}
    assert fusion.record_reason(b, ALICE.public_hex, DELTA, record) is None
    assert "not by the designated fuser" in fusion.record_reason(b, BOB.public_hex, DELTA, record)
    assert fusion.record_reason(b, ALICE.public_hex, DELTA, None) == "fusion: no fusion record from the designated fuser"
    assert "names delta" in fusion.record_reason(b, ALICE.public_hex, PACK, record)
    assert "other packs" in fusion.record_reason(b, ALICE.public_hex, DELTA, {**record, "probe_id": MODEL})
    commitments = {"n1": {"delta_ids": [DELTA, PACK], "domains": {DELTA: "fused", PACK: "math"}},
                   "n2": {"delta_ids": [MODEL], "domains": {MODEL: "fused"}}}
    assert fusion.fused_deltas(commitments) == {DELTA: "n1", MODEL: "n2"}


def test_a_fusion_cut_short_by_a_restart_is_started_again(tmp_path):
    import asyncio
    from types import SimpleNamespace

    from hivemerge.node.coordinators.fusion_rounds import FusionRounds

    me = "ab" * 32
    proposal = {"round_id": "cd" * 32, "base_id": "ef" * 32, "deadline": 2e9, "issued_at": 1.0, "recipe": {"fusion": {"fuser": me}}}
    node = SimpleNamespace(charter=None, clock=time.time, home=tmp_path, identity=SimpleNamespace(public_hex=me), published=lambda: [{"base_id": "ef" * 32}])

    async def proposals(base_id):
        return [proposal]

    fusions = FusionRounds(SimpleNamespace(node=node, proposals=proposals))
    started = []

    async def fuse(p):
        started.append(p["round_id"])

    fusions._fuse = fuse

    async def tick():
        await fusions.tick(now=1000.0)
        await asyncio.gather(*fusions._running.values())

    fusions._save(proposal["round_id"], {"phase": "fusing", "started": 1.0})  # left by a node that died mid-fusion
    asyncio.run(tick())
    assert started == [proposal["round_id"]]
    for phase in ("failed", "fused"):  # a finished fusion is not run again
        fusions._running.clear()
        fusions._save(proposal["round_id"], {"phase": phase})
        fusions._commit = lambda *a: asyncio.sleep(0)
        asyncio.run(tick())
    assert started == [proposal["round_id"]]


# -- pivot: merge -------------------------------------------------------------------------
EXPERT_A, EXPERT_B = (hashlib.sha256(n.encode()).hexdigest() for n in ("expert-a", "expert-b"))
PINNED = {EXPERT_A: "math", EXPERT_B: "logic"}


def test_the_pivot_is_the_base_unless_a_proposal_pins_the_merge_it_distils_into():
    assert block()["pivot"] == "base" and not fusion.merges_pivot(block())
    merged = block(pivot="merge", pivot_deltas=PINNED)
    assert fusion.merges_pivot(merged) and merged["pivot_deltas"] == PINNED
    # as a user writes it the proposer pins the deltas; a proposal must carry them
    assert fusion.check_fusion_block({"packs": {"domains": ["x"]}, "pivot": "merge"})["pivot"] == "merge"
    for changes, message in [
        ({"pivot": "experts"}, "fusion.pivot: must be one of ['base', 'merge']"),
        ({"pivot": "merge"}, "fusion.pivot_deltas: a proposal with pivot: merge names the deltas"),
        ({"pivot": "merge", "pivot_deltas": {}}, "fusion.pivot_deltas: a proposal with pivot: merge names the deltas"),
        ({"pivot": "merge", "pivot_deltas": [EXPERT_A]}, "fusion.pivot_deltas: a proposal with pivot: merge names the deltas"),
        ({"pivot": "merge", "pivot_deltas": {"not-an-id": "math"}}, "fusion.pivot_deltas: 'not-an-id' is not a delta id"),
        ({"pivot": "merge", "pivot_deltas": {EXPERT_A: ""}}, "needs an expert's domain"),
        ({"pivot": "merge", "pivot_deltas": {EXPERT_A: fusion.FUSED_DOMAIN}}, "needs an expert's domain"),
        ({"pivot_deltas": PINNED}, "fusion.pivot_deltas: only with pivot: merge"),
    ]:
        with pytest.raises(UserInputError) as raised:
            block(**changes)
        assert message in str(raised.value), raised.value


def test_a_merge_pivot_stands_only_for_the_round_that_merges_exactly_its_deltas():
    merged = block(pivot="merge", pivot_deltas=PINNED)
    domains = {EXPERT_A: "math", EXPERT_B: "logic", DELTA: fusion.FUSED_DOMAIN}
    assert fusion.pivot_reason(merged, sorted([EXPERT_A, EXPERT_B]), domains) is None
    assert fusion.pivot_reason(merged, [EXPERT_A], domains) == (
        f"fusion: the pivot merges delta {EXPERT_B[:12]}, which this round does not include")
    assert fusion.pivot_reason(merged, sorted([EXPERT_A, EXPERT_B]), {**domains, EXPERT_A: "strings"}) == (
        f"fusion: the pivot merges delta {EXPERT_A[:12]} as 'math', but it was committed as 'strings'")
    # an expert that joined after the proposal makes another merge: the fused delta would drop it
    late = hashlib.sha256(b"expert-c").hexdigest()
    assert fusion.pivot_reason(merged, sorted([EXPERT_A, EXPERT_B, late]), {**domains, late: "math"}) == (
        f"fusion: this round includes delta {late[:12]}, which the pivot does not merge")
