"""The local control endpoint: how commands reach the node running on a home.

``hivemerge node start`` listens on a Unix socket ``HOME/node.sock`` (mode 0600: only
the home's owner may drive the node). A request is one JSON line
``{"cmd": NAME, "args": {...}}``; the answer is one JSON line ``{"ok": true,
"result": ...}`` or ``{"ok": false, "error": "...", "user_error": bool}``. The
commands are declared once, as :data:`COMMANDS` (methods of the node); the server
dispatches and the client (:class:`RemoteNode`) is derived from that one list.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hivemerge.protocol.errors import UserInputError

SOCKET_FILE = "node.sock"
MAX_REQUEST = 1 << 20
# The node methods other processes may call; arguments and results are JSON values.
COMMANDS = ("status", "publish", "experts", "providers", "fetch", "propose", "round_status", "publish_pack", "packs",
            "charter_status", "publish_charter")


class NodeUnavailable(Exception):
    pass


def socket_path(home: Path) -> Path:
    return Path(home) / SOCKET_FILE


def node_is_running(home: Path) -> bool:
    try:
        call(home, "status", {}, timeout=5)
        return True
    except NodeUnavailable:
        return False


def call(home: Path, cmd: str, args: dict, timeout: float = 3600) -> Any:
    path = socket_path(home)
    if not path.exists():
        raise NodeUnavailable(f"no node is running on {home}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise NodeUnavailable(f"no node is running on {home} (stale {path})") from None
    with sock, sock.makefile("rwb") as stream:
        stream.write(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        stream.flush()
        line = stream.readline()
    if not line:
        raise NodeUnavailable(f"the node on {home} closed the connection")
    answer = json.loads(line)
    if answer.get("ok"):
        return answer["result"]
    if answer.get("user_error"):
        raise UserInputError(answer["error"])
    raise RuntimeError(f"node error: {answer['error']}")


class RemoteNode:
    """The node running on ``home``, called like a local :class:`~hivemerge.node.node.Node`."""

    def __init__(self, home: Path):
        self.home = Path(home)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in COMMANDS:
            raise AttributeError(name)
        return lambda **args: call(self.home, name, args)


class ControlServer:
    """Serves the :data:`COMMANDS` of ``node`` on the home's socket, one thread per connection."""

    def __init__(self, home: Path, node: Any):
        self.path = socket_path(home)
        if node_is_running(home):
            raise UserInputError(f"a node is already running on {home}")
        self.path.unlink(missing_ok=True)
        handlers = {name: getattr(node, name) for name in COMMANDS}

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(MAX_REQUEST)
                try:
                    request = json.loads(line)
                    fn = handlers[request["cmd"]]
                    answer = {"ok": True, "result": fn(**request.get("args", {}))}
                except UserInputError as exc:
                    answer = {"ok": False, "error": str(exc), "user_error": True}
                except Exception as exc:  # reported to the caller, the node keeps serving
                    answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "user_error": False}
                self.wfile.write(json.dumps(answer).encode() + b"\n")

        old_umask = os.umask(0o177)
        try:
            self._server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
        finally:
            os.umask(old_umask)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)
