"""Helpers for the network tests: real nodes on 127.0.0.1, always stopped.

- :class:`NodePool` starts in-process :class:`~hivemerge.node.node.Node` objects and
  closes every one it started (a test's fixture finalizer calls :meth:`NodePool.close_all`).
- :class:`NodeProcess` runs ``hivemerge node start`` as a real subprocess and reads the
  lines it prints; it is SIGINT-ed (or SIGKILL-ed) by the test or by its finalizer.
- short-lived ``hivemerge`` commands run through :class:`cli_runner.CliRunner`.
- :func:`p2pd_pids` finds the p2pd daemons whose identity file lies under a folder: every
  node a test starts has its home (and so its ``-id=HOME/p2p.key``) under pytest's temp
  folder, so the daemons the tests started can be told from anyone else's.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_runner import CliResult, CliRunner  # noqa: F401  (re-exported for the tests)
from delta_fixtures import family_shapes, perturbed, random_tensors, save_model

from hivemerge.node.local_network import LOOPBACK, LocalNetwork

TEST_TTL = 30.0  # seconds: short record lives (refreshed every 10 s while a node runs)
START_TIMEOUT = 60.0  # a node process must print "serving" within this long (2 busy cores)
STOP_TIMEOUT = 40.0


# -- p2pd bookkeeping ----------------------------------------------------------------

def p2pd_pids(under: Path) -> list[int]:
    """p2pd processes whose command line names a path under ``under``."""
    needle = str(under).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"p2pd" and any(needle in arg for arg in argv):
            found.append(int(entry))
    return found


def wait_p2pd_gone(under: Path, timeout: float = 15.0) -> list[int]:
    """Waits (bounded) until no p2pd under ``under`` runs; returns those still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = p2pd_pids(under)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def check_no_leftover_p2pd(under: Path) -> None:
    """Fails (after killing them) if daemons started under ``under`` outlived their nodes."""
    settle_garbage()
    left = wait_p2pd_gone(under)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"p2pd processes left running by the tests: {left}"


@pytest.fixture(scope="module", autouse=True)
def no_leftover_daemons(tmp_path_factory):
    """Autouse in every test module that imports it: no p2pd outlives the module."""
    yield
    check_no_leftover_p2pd(tmp_path_factory.getbasetemp())


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- in-process nodes ----------------------------------------------------------------

class NodePool(LocalNetwork):
    """The tests' loopback network (node/local_network.py): nodes join only the peers given,
    with short record lives; :meth:`close_all` also finalizes what the dead nodes left."""

    def __init__(self, root: Path):
        super().__init__(root, record_ttl=TEST_TTL)

    def start(self, name: str, peers: list | tuple = (), ttl: float = TEST_TTL, chunk_size: int | None = None,
              listen: list[str] | None = None, home: Path | None = None, client_mode: bool = False):
        node = super().start(name, peers=peers, home=home, listen=listen, client_mode=client_mode, record_ttl=ttl)
        if chunk_size is not None:
            node.store.chunk_size = chunk_size  # bundles made from now on use it
        return node

    def close_all(self) -> None:
        try:
            super().close_all(side_by_side=True)  # a node's leaving may wait on peers that died
        finally:
            settle_garbage()


def settle_garbage() -> None:
    """Finalize the dead nodes' asyncio tasks now. A killed daemon leaves hivemind tasks
    with unretrieved exceptions; if the garbage collector happened to finalize them in
    the middle of an ``ast.parse`` (pytest rewriting or formatting), the traceback that
    asyncio logs would re-enter the parser, and CPython 3.11 then fails that parse with
    "SystemError: AST constructor recursion depth mismatch"."""
    import gc

    gc.collect()


def kill_daemon(node) -> int:
    """SIGKILL a node's p2pd: the node vanishes from the network as if its machine died."""
    pid = node.network.p2p._child.pid
    os.kill(pid, signal.SIGKILL)
    return pid


# -- node processes ------------------------------------------------------------------

def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "HIVEMERGE_HOME"}


class NodeProcess:
    """``hivemerge node start`` in a subprocess of its own."""

    def __init__(self, home: Path, peers: list[str] | tuple = (), listen: list[str] | None = None,
                 ttl: float = TEST_TTL, extra: list[str] | tuple = ()):
        self.home = Path(home)
        argv = [sys.executable, "-m", "hivemerge", "node", "start", "--home", str(self.home), "--record-ttl", str(ttl),
                *map(str, extra)]
        for maddr in listen or [LOOPBACK]:
            argv += ["--listen", maddr]
        for maddr in peers:
            argv += ["--peer", str(maddr)]
        self.home.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self.home.parent / f"{self.home.name}.stderr.{time.monotonic_ns()}", "w+")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=_clean_env(),
                                     bufsize=1)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_line(self, prefix: str, timeout: float = START_TIMEOUT) -> str:
        for line in self.lines:
            if line.startswith(prefix):
                return line
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {prefix!r} line within {timeout}s; output: {self.lines}; {self.stderr()}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"node exited ({self.proc.poll()}) before printing {prefix!r}: {self.lines}; {self.stderr()}")
            if line.startswith(prefix):
                return line

    def wait_serving(self) -> "NodeProcess":
        self.wait_line("serving; Ctrl-C to stop")
        return self

    @property
    def peer_id(self) -> str:
        return self.wait_line("node ").split()[1]

    @property
    def maddrs(self) -> list[str]:
        self.wait_serving()
        return [line.split(" ", 1)[1] for line in self.lines if line.startswith("listening ")]

    def stderr(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()

    def interrupt(self, timeout: float = STOP_TIMEOUT) -> int:
        """Ctrl-C: returns the exit status (the node must leave by itself)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"node on {self.home} did not stop within {timeout}s after SIGINT")
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        """Finalizer: stop it however it can be stopped."""
        try:
            if self.proc.poll() is None:
                try:
                    self.interrupt(timeout=20)
                except AssertionError:
                    pass
        finally:
            self.kill()
            self._stderr.close()


# -- short-lived CLI commands ----------------------------------------------------------

# -- models ------------------------------------------------------------------------------

@dataclass
class Models:
    base: Path
    expert: Path  # math
    expert2: Path  # code


def build_models(root: Path, hidden: int = 16) -> Models:
    """A tiny base and two experts of it. ``hidden=64`` gives a lossless delta of ~40 KB,
    many chunks at a 1 KiB chunk size."""
    shapes = family_shapes(hidden)
    base = random_tensors(0, shapes)
    return Models(
        base=save_model(root / "base", base),
        expert=save_model(root / "expert-math", perturbed(base, 1)),
        expert2=save_model(root / "expert-code", perturbed(base, 2)),
    )


def sha256_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def model_manifest(directory: Path) -> dict:
    from hivemerge.merge.io.manifest import build_model_manifest
    from hivemerge.merge.io.sources import SafetensorsModel

    return build_model_manifest(SafetensorsModel(directory))


def tensors_equal(a: Path, b: Path) -> bool:
    from delta_fixtures import load_dir_tensors

    ta, tb = load_dir_tensors(a), load_dir_tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
