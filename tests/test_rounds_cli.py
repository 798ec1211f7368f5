"""The round commands against a real ``hivemerge node start`` process on 127.0.0.1:
``round propose``, ``round status --json`` and ``fetch`` without an ID (the latest
consensus), with two in-process nodes taking part in the round."""

from __future__ import annotations

import json

import pytest
from conftest import make_llama, write_recipe
from network_fixtures import CliRunner, NodeProcess, check_no_leftover_p2pd
from round_fixtures import RoundNet, build_family, model_id_of, wait_round_done, wait_until

DOMAINS = ["math", "code", "logic"]


@pytest.fixture
def setup(tmp_path):
    family = build_family(tmp_path / "models", DOMAINS, base_seed=9)
    cli = CliRunner(tmp_path / "cli")
    net = RoundNet(tmp_path / "nodes")
    proc = None
    try:
        proc = NodeProcess(tmp_path / "h", ttl=60)
        yield {"family": family, "cli": cli, "net": net, "proc": proc, "tmp": tmp_path}
    finally:
        try:
            if proc is not None:
                proc.close()
            net.close_all()
            cli.close()
        finally:
            check_no_leftover_p2pd(tmp_path)


def test_propose_status_and_fetch_the_consensus_from_the_command_line(setup):
    family, cli, net, proc, tmp = (setup[k] for k in ("family", "cli", "net", "proc", "tmp"))
    home = proc.home
    maddrs = proc.maddrs  # waits until it serves
    published = cli("publish", family["math"], "--domain", "math", "--base", family["base"], "--home", home, "--json").json()
    b, c = net.start("b", peers=maddrs), net.start("c", peers=maddrs)
    b.publish(family["code"], "code", family["base"])
    c.publish(family["logic"], "logic", family["base"])

    # a relative base_model is looked up next to the recipe (the CLI runs elsewhere)
    recipe = write_recipe(family["base"].parent / "round.yaml", {
        "merge_method": "ties", "base_model": "base", "select": {"domains": DOMAINS},
        "parameters": {"weight": 1.0, "density": 0.5}, "deadline": 6,
    })
    proposed = cli("round", "propose", recipe, "--home", home)
    assert proposed.returncode == 0, proposed.stderr
    round_id = proposed.stdout.strip()
    assert len(round_id) == 64 and f"proposed round {round_id[:12]}" in proposed.stderr

    states = wait_round_done([b, c], round_id)
    assert all(s["phase"] == "attested" for s in states), [s.get("error") for s in states]
    result_id = states[0]["result_id"]

    def final_status():
        run = cli("round", "status", "--json", "--home", home)
        assert run.returncode == 0, run.stderr
        rows = json.loads(run.stdout)
        return rows if rows and rows[0]["phase"] in ("attested", "failed") and rows[0]["final"] else None

    rows = wait_until(final_status, 60, interval=1.0, what="the node process to attest")
    assert [r["proposal"]["round_id"] for r in rows] == [round_id]
    row = rows[0]
    assert row["phase"] == "attested" and row["result_id"] == result_id == row["final_result"]
    assert row["committed"] == [published["delta_id"]]
    assert len(row["commitments"]) == 3 and len(row["attesters"]) == 3
    assert row["excluded"] == {} and len(row["included"]) == 3

    table = cli("round", "status", "--home", home)
    assert table.returncode == 0 and "1 round(s)" in table.stdout and "attested" in table.stdout, table.stdout
    assert round_id[:8] in table.stdout  # rich shortens the column to the 80-column terminal

    # a client that took no part: no node runs on its home, it joins through --peer
    out = tmp / "consensus"
    fetched = cli("fetch", "--out", out, "--base", family["base"], "--home", tmp / "h2", "--peer", maddrs[0], "--json")
    summary = fetched.json()
    assert summary["content"] == result_id and summary["round_id"] == round_id
    assert len(summary["attesters"]) == 3
    assert model_id_of(out) == result_id
    assert f"round {round_id[:12]}" in (out / "README.md").read_text()
    plain = cli("fetch", "--out", tmp / "again", "--base", family["base"], "--home", tmp / "h2", "--peer", maddrs[0])
    assert plain.returncode == 0, plain.stderr
    assert f"consensus of round {round_id[:12]}, attested by 3" in plain.stderr
    assert "no network charter: the latest consensus was judged by a private test network's rules" in plain.stderr

    # user errors: one line, exit 2
    other = make_llama(tmp / "other-base", seed=77)
    missing = cli("fetch", "--out", tmp / "none", "--base", other, "--home", tmp / "h3", "--peer", maddrs[0])
    assert missing.returncode == 2, (missing.stdout, missing.stderr)
    assert missing.stderr.startswith("error: no final consensus model for base") and "Traceback" not in missing.stderr
    assert not (tmp / "none").exists()
    bad = write_recipe(tmp / "bad.yaml", {"merge_method": "ties", "base_model": str(family["base"]), "deadline": 5})
    refused = cli("round", "propose", bad, "--home", home)
    assert refused.returncode == 2 and refused.stderr.startswith("error: select: required"), refused.stderr

    assert proc.interrupt() == 0
    assert proc.lines[-1] == "node stopped"


def test_a_search_round_proposed_from_the_command_line(setup, tmp_path):
    """``round propose`` with a ``search:`` block, against a running node process that
    holds no expert: two in-process owners search, the node process proposes the final
    merge round, and ``round status`` shows the search and its final round."""
    from search_fixtures import char_family

    cli, net, proc = setup["cli"], setup["net"], setup["proc"]
    family = char_family(tmp_path / "chars")
    home, maddrs = proc.home, proc.maddrs
    b, c = net.start("b", peers=maddrs), net.start("c", peers=maddrs)
    b.publish(family["a"], "math", family["base"])
    c.publish(family["b"], "logic", family["base"])
    recipe = write_recipe(family["base"].parent / "search.yaml", {
        "merge_method": "task_arithmetic", "base_model": "base", "select": {"domains": ["math", "logic"]},
        "parameters": {"weight": 0.5}, "deadline": 5, "quorum": 1.0, "fetch_window": 5,
        "search": {"generations": 1, "popsize": 2, "blocks": 2, "count": 4, "generation_seconds": 20, "final_deadline": 4},
    })
    proposed = cli("round", "propose", recipe, "--home", home)
    assert proposed.returncode == 0, proposed.stderr
    sid = proposed.stdout.strip()
    assert len(sid) == 64 and f"proposed search round {sid[:12]}" in proposed.stderr, proposed.stderr

    def searched():
        states = [n.searches.state(sid) for n in (b, c)]
        return states if all(s and s["phase"] in ("done", "failed") for s in states) else None

    states = wait_until(searched, 120, what="the owners to finish the search")
    assert [s["phase"] for s in states] == ["done", "done"], [s.get("error") for s in states]

    def proposer_done():
        table = cli("round", "status", "--home", home)
        return table if "search round(s)" in table.stdout and " done " in table.stdout and "proposer" in table.stdout else None

    table = wait_until(proposer_done, 60, interval=1.0, what="the node process to end the search")
    assert sid[:8] in table.stdout and "1/1" in table.stdout, table.stdout
    final = json.loads((home / "searches" / f"{sid}.json").read_text())["final_round"]
    finals = wait_round_done([b, c], final)
    assert [s["phase"] for s in finals] == ["attested", "attested"], [s.get("error") for s in finals]
    assert finals[0]["proposal"]["recipe"]["domain_parameters"] == states[0]["best"]["domain_parameters"]
    bad = write_recipe(tmp_path / "bad-search.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(family["base"]), "select": {"domains": ["math"]},
        "deadline": 5, "search": {"generations": 0, "popsize": 2, "blocks": 1}})
    refused = cli("round", "propose", bad, "--home", home)
    assert refused.returncode == 2 and refused.stderr.startswith("error: search.generations: must be an integer"), refused.stderr
