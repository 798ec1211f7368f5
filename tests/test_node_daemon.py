"""A running node whose p2p daemon dies notices, says so and stops (exit 1), rather than
running on unable to serve or reach the DHT."""

from __future__ import annotations

import os
import signal
import time

from network_fixtures import NodeProcess, no_leftover_daemons, p2pd_pids  # noqa: F401  (autouse fixture)

EXIT_BOUND = 15.0  # seconds: the watchdog checks every second; leaving without a daemon is quick


def test_node_start_stops_when_its_p2p_daemon_dies(tmp_path):
    node = NodeProcess(tmp_path / "home")
    try:
        node.wait_serving()
        (pid,) = p2pd_pids(tmp_path / "home")
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        code = node.proc.wait(EXIT_BOUND)
        took = time.monotonic() - killed
        node._reader.join(5)  # the last lines it printed
        assert code == 1, (code, node.stderr())
        assert "p2p daemon died" in node.stderr() and "stopping the node" in node.stderr()
        assert node.lines[-1] == "node stopped"
        assert took < EXIT_BOUND
        print(f"node exited {took:.1f}s after its daemon was killed; stderr: {node.stderr().strip()}")
    finally:
        node.close()
