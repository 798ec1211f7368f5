"""Helpers for the network tests: real nodes on 127.0.0.1, always stopped.

- :class:`NodePool` starts in-process :class:`~hivemerge.node.node.Node` objects and
  closes every one it started (a test's fixture finalizer calls :meth:`NodePool.close_all`).
- :class:`NodeProcess` runs ``hivemerge node start`` as a real subprocess and reads the
  lines it prints; it is SIGINT-ed (or SIGKILL-ed) by the test or by its finalizer.
- :class:`ForkingCli` runs short-lived ``hivemerge`` commands as forked children of one
  interpreter that imported the CLI and hivemind once (as ``delta_fixtures.CliRunner``
  does), each with an alarm so that a hung command dies instead of hanging the suite.
- :func:`p2pd_pids` finds the p2pd daemons whose identity file lies under a folder: every
  node a test starts has its home (and so its ``-id=HOME/p2p.key``) under pytest's temp
  folder, so the daemons the tests started can be told from anyone else's.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from delta_fixtures import family_shapes, perturbed, random_tensors, save_model

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
TEST_TTL = 30.0  # seconds: short record lives (refreshed every 10 s while a node runs)
START_TIMEOUT = 60.0  # a node process must print "serving" within this long (2 busy cores)
STOP_TIMEOUT = 40.0
CLI_ALARM = 90  # seconds a forked CLI command may run before SIGALRM ends it


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

class NodePool:
    """Starts in-process nodes on loopback; :meth:`close_all` stops every one still open."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.open: list = []

    def start(self, name: str, peers: list | tuple = (), ttl: float = TEST_TTL, chunk_size: int | None = None,
              listen: list[str] | None = None, home: Path | None = None, client_mode: bool = False):
        from hivemerge.node.node import Node

        node = Node(home or self.root / name, listen=listen or LOOPBACK, peers=[str(p) for p in peers],
                    client_mode=client_mode, record_ttl=ttl)
        if chunk_size is not None:
            node.store.chunk_size = chunk_size  # bundles made from now on use it
        self.open.append(node)
        return node

    def close(self, node) -> None:
        if node in self.open:
            self.open.remove(node)
            node.close()

    def close_all(self) -> None:
        """Closes them side by side (a node's leaving may wait on peers that died)."""
        from concurrent.futures import ThreadPoolExecutor

        nodes, self.open = self.open, []
        if not nodes:
            return
        with ThreadPoolExecutor(len(nodes)) as pool:
            futures = [pool.submit(node.close) for node in nodes]
        settle_garbage()
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]


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
                 ttl: float = TEST_TTL):
        self.home = Path(home)
        argv = [sys.executable, "-m", "hivemerge", "node", "start", "--home", str(self.home), "--record-ttl", str(ttl)]
        for maddr in listen or LOOPBACK:
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

_DRIVER = r"""
import json, os, signal, sys, traceback
import hivemerge.node.cli as cli
import hivemerge.merge.delta, hivemerge.node.store, hivemerge.node.node, hivemerge.node.control  # once, before forking

proto = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush(); proto.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(job["alarm"])  # a hung command dies (SIGALRM) instead of hanging the tests
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
                f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd)
                os.close(f)
            os.chdir(job["cwd"])
            sys.argv = ["hivemerge", *job["argv"]]
            try:
                cli.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    proto.write(json.dumps(os.waitstatus_to_exitcode(status)) + "\n")
    proto.flush()
"""


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        assert self.returncode == 0, (self.returncode, self.stdout, self.stderr)
        return json.loads(self.stdout)


class ForkingCli:
    """Runs ``hivemerge ARGS`` as forked children of one interpreter; each child is a
    separate process with its own argv, stdout, stderr and exit status."""

    def __init__(self, scratch: Path):
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen([sys.executable, "-c", _DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, env=_clean_env(), bufsize=1)
        self._count = 0
        self._lock = threading.Lock()

    def __call__(self, *args, alarm: int = CLI_ALARM) -> CliResult:
        with self._lock:
            self._count += 1
            out, err = self.scratch / f"{self._count}.out", self.scratch / f"{self._count}.err"
            job = {"argv": [str(a) for a in args], "cwd": str(self.scratch), "alarm": alarm,
                   "stdout": str(out), "stderr": str(err)}
            self._proc.stdin.write(json.dumps(job) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError("the CLI driver process died")
            return CliResult(json.loads(line), out.read_text(), err.read_text())

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)


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
    from hivemerge.merge.manifest import build_model_manifest
    from hivemerge.merge.sources import SafetensorsModel

    return build_model_manifest(SafetensorsModel(directory))


def tensors_equal(a: Path, b: Path) -> bool:
    from delta_fixtures import load_dir_tensors

    ta, tb = load_dir_tensors(a), load_dir_tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
