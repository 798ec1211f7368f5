"""End to end through the real command line: ``hivemerge node start`` processes on
127.0.0.1, and ``publish`` / ``experts`` / ``fetch`` commands reaching them through the
home's control socket, or joining for a moment through ``--peer`` with no node on their
home. Nodes are stopped with SIGINT (and one with SIGKILL); every daemon must go with them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from network_fixtures import (
    CliRunner,
    NodeProcess,
    build_models,
    model_manifest,
    no_leftover_daemons,  # noqa: F401 (autouse)
    p2pd_pids,
    sha256_file,
    tensors_equal,
    wait_p2pd_gone,
)

from hivemerge.merge.deltas.delta import DeltaFile, apply_delta


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    runner = CliRunner(tmp_path_factory.mktemp("cli"))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def processes():
    started: list[NodeProcess] = []
    yield started
    for proc in started:
        proc.close()


@pytest.fixture(scope="module")
def network(tmp_path_factory, processes, cli):
    """Node processes A (the bootstrap, which lists and fetches) and B (the publisher);
    B has published one expert. Short-lived clients are the third and fourth nodes."""
    root = tmp_path_factory.mktemp("e2e")  # short: a Unix socket path must stay under 108 bytes
    a = NodeProcess(root / "a")
    processes.append(a)
    models = build_models(root / "models")  # while A starts
    (maddr_a,) = a.wait_serving().maddrs
    b = NodeProcess(root / "b", peers=[maddr_a])
    processes.append(b)
    b.wait_serving()

    published = cli("publish", models.expert, "--domain", "math", "--base", models.base, "--home", b.home, "--json").json()
    return {"root": root, "models": models, "a": a, "b": b, "maddr_a": maddr_a, "published": published}


def check_stopped(proc: NodeProcess, code: int) -> None:
    assert code == 0, (code, proc.lines, proc.stderr())
    assert proc.lines[-1] == "node stopped", proc.lines
    assert "Traceback" not in proc.stderr()
    assert not wait_p2pd_gone(proc.home), f"p2pd of {proc.home} outlived its node"
    assert not (proc.home / "node.sock").exists()


def test_node_start_prints_where_it_listens(network):
    for name in ("a", "b"):
        proc = network[name]
        first = proc.lines[0].split()
        assert first[0] == "node" and first[1].startswith("12D3KooW") and str(proc.home) in proc.lines[0]
        (maddr,) = proc.maddrs
        assert maddr.startswith("/ip4/127.0.0.1/tcp/") and maddr.endswith(f"/p2p/{proc.peer_id}")
        assert proc.lines[-1] == "serving; Ctrl-C to stop"
        assert len(p2pd_pids(proc.home)) == 1
    assert network["a"].peer_id != network["b"].peer_id


def test_publish_list_and_fetch_through_running_nodes_and_a_short_lived_client(network, cli):
    root, models, published = network["root"], network["models"], network["published"]
    a, b = network["a"], network["b"]
    delta_id, expert_id = published["delta_id"], published["expert_id"]
    b_file = b.home / "store" / "objects" / f"{delta_id}.delta.safetensors"
    assert DeltaFile(b_file).id == delta_id and published["domain"] == "math"
    identity = cli("identity", "show", "--home", b.home)
    assert identity.returncode == 0 and published["publisher"] in identity.stdout + identity.stderr

    # Every running node lists it, as JSON and as a table.
    for proc in (a, b):
        (row,) = cli("experts", "--json", "--home", proc.home).json()
        assert row["delta_id"] == delta_id and row["expert_id"] == expert_id and row["domain"] == "math"
        assert row["publisher"] == published["publisher"] and row["peer_id"] == b.peer_id
        assert row["maddrs"] == b.maddrs
    assert cli("experts", "--json", "--domain", "code", "--home", a.home).json() == []
    table = cli("experts", "--home", a.home)
    assert table.returncode == 0 and "1 expert(s)" in table.stdout and "math" in table.stdout

    # A fetches the delta (the publisher's very bytes), then the rebuilt expert by its id.
    got = cli("fetch", delta_id, "--out", root / "a-delta", "--home", a.home, "--json").json()
    assert got["chunks_by_provider"] == {b.peer_id: 1} and got["liars"] == {} and got["failed"] == {}
    assert Path(got["out"]).parent == root / "a-delta"
    assert sha256_file(got["out"]) == sha256_file(b_file)
    rebuilt = cli("fetch", expert_id, "--base", models.base, "--out", root / "a-expert", "--home", a.home)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"fetched {delta_id[:12]}" in rebuilt.stderr and "from the local store" in rebuilt.stderr
    apply_delta(models.base, b_file, root / "local-expert")
    assert model_manifest(root / "a-expert") == model_manifest(root / "local-expert")
    assert tensors_equal(root / "a-expert", root / "local-expert")

    # A short-lived client: no node on its home, it joins through --peer and leaves.
    d = root / "d"
    (row,) = cli("experts", "--json", "--peer", network["maddr_a"], "--home", d).json()
    assert row["delta_id"] == delta_id
    got = cli("fetch", delta_id, "--out", root / "d-delta", "--peer", network["maddr_a"], "--home", d, "--json").json()
    assert sha256_file(got["out"]) == sha256_file(b_file)
    assert set(got["chunks_by_provider"]) <= {a.peer_id, b.peer_id} and sum(got["chunks_by_provider"].values()) == 1
    rebuilt = cli("fetch", delta_id, "--base", models.base, "--out", root / "d-expert", "--peer", network["maddr_a"],
                  "--home", d)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert model_manifest(root / "d-expert") == model_manifest(root / "local-expert")
    assert not (d / "node.sock").exists() and p2pd_pids(d) == []
    # The client did not stay on as a provider: only B and A (which fetched it) are.
    providers = {r["peer_id"] for r in _providers(a.home, delta_id)}
    assert providers == {a.peer_id, b.peer_id}

    # Without a node and without --peer, a network command says what to do (exit 2, one line).
    lonely = cli("experts", "--home", root / "nobody")
    assert lonely.returncode == 2 and lonely.stderr.startswith("error: no node is running")
    assert len(lonely.stderr.splitlines()) == 1
    # publish needs a running node (it must keep serving what it publishes).
    refused = cli("publish", models.expert2, "--domain", "code", "--base", models.base, "--home", root / "nobody")
    assert refused.returncode == 2 and refused.stderr.startswith("error: ")


def _providers(home: Path, content: str) -> list[dict]:
    from hivemerge.node.control import RemoteNode

    return RemoteNode(home).providers(content=content)


def test_stop_restart_and_kill(network, cli, processes):
    """SIGINT stops a node cleanly (exit 0, 'node stopped', its daemon gone, its records
    replaced by 'gone' ones); restarted on the same home and port it has the same peer
    id, is listed again at once and serves what it had; SIGKILL leaves no daemon."""
    root, published = network["root"], network["published"]
    a, b = network["a"], network["b"]
    delta_id = published["delta_id"]
    b_file = b.home / "store" / "objects" / f"{delta_id}.delta.safetensors"

    peer_id, (maddr_b,) = b.peer_id, b.maddrs
    check_stopped(b, b.interrupt())
    assert cli("experts", "--json", "--home", a.home).json() == []  # gone, not merely expiring

    listen = maddr_b.split("/p2p/")[0]
    b2 = NodeProcess(b.home, peers=[network["maddr_a"]], listen=[listen])
    processes.append(b2)
    b2.wait_serving()
    assert b2.peer_id == peer_id and b2.maddrs == [maddr_b]
    (row,) = cli("experts", "--json", "--home", a.home).json()  # listed again, at once
    assert row["delta_id"] == delta_id and row["peer_id"] == peer_id and row["maddrs"] == [maddr_b]
    status = _status(b2.home)
    assert status["peer_id"] == peer_id and status["public_key"] == published["publisher"]
    assert delta_id in status["published"] and delta_id in status["stored"]

    # A leaves too; a fresh client fetches from the restarted node, the only live provider.
    check_stopped(a, a.interrupt())
    got = cli("fetch", delta_id, "--out", root / "e-delta", "--peer", maddr_b, "--home", root / "e", "--json").json()
    assert got["chunks_by_provider"] == {peer_id: 1}
    assert sha256_file(got["out"]) == sha256_file(b_file)

    # A hard kill: no Ctrl-C, no goodbye; the daemon must not outlive the node.
    b2.kill()
    assert not wait_p2pd_gone(b2.home, timeout=10), "p2pd outlived a SIGKILL-ed node"
    stale = cli("experts", "--home", b2.home)  # its socket file is left behind, but nobody answers
    assert stale.returncode == 2 and "no node is running" in stale.stderr


def _status(home: Path) -> dict:
    from hivemerge.node.control import RemoteNode

    return RemoteNode(home).status()
