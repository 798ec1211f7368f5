"""Running the real ``hivemerge`` CLI many times, fast.

Every ``hivemerge`` run in a fresh interpreter spends about two CPU-seconds importing
torch. :class:`CliRunner` imports the CLI once in a driver process and forks a child per
command line: each child is its own process running the console script's ``main()``
with its own argv, working directory, environment and stdout/stderr files, so exit
codes, output and tracebacks are what a separate ``hivemerge`` process gives (a test in
test_delta_cli.py checks that against ``python -m hivemerge``). A child that hangs is
ended by SIGALRM instead of hanging the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

CLI_ALARM = 90  # seconds a forked CLI command may run before SIGALRM ends it

_DRIVER = r"""
import json, os, signal, sys, traceback
import hivemerge.node.cli.app as cli
import hivemerge.merge.deltas.delta, hivemerge.merge.engine, hivemerge.merge.recipe  # imported once, before forking
import hivemerge.node.storage.store, hivemerge.node.node, hivemerge.node.control
exec(sys.argv[1])  # the caller's extra imports

proto = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush(); proto.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(job["alarm"])
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
                f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd)
                os.close(f)
            os.chdir(job["cwd"])
            os.environ.update(job["env"])
            sys.argv = ["hivemerge", *job["argv"]]
            try:
                cli.main()
                code = 0
            except SystemExit as exc:
                if exc.code is None:
                    code = 0
                elif isinstance(exc.code, int):
                    code = exc.code
                else:
                    print(exc.code, file=sys.stderr)
                    code = 1
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

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()

    def json(self):
        assert self.returncode == 0, (self.returncode, self.stdout, self.stderr)
        return json.loads(self.stdout)


class CliRunner:
    """Runs ``hivemerge ARGS`` as forked children of one interpreter that imported the CLI
    (and ``preload``, extra import lines) once. Calls from several threads are serialized."""

    def __init__(self, scratch: Path, preload: str = ""):
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "HIVEMERGE_HOME"}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, preload], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=env, bufsize=1,
        )
        self._count = 0
        self._lock = threading.Lock()

    def __call__(self, *args, cwd: Path | None = None, env: dict | None = None, alarm: int = CLI_ALARM) -> CliResult:
        with self._lock:
            self._count += 1
            out, err = self.scratch / f"{self._count}.out", self.scratch / f"{self._count}.err"
            job = {"argv": [str(a) for a in args], "cwd": str(cwd or self.scratch), "env": env or {},
                   "alarm": alarm, "stdout": str(out), "stderr": str(err)}
            self._proc.stdin.write(json.dumps(job) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError("the CLI driver process died")
            return CliResult(json.loads(line), out.read_text(), err.read_text())

    def close(self) -> None:
        """The driver waits idle on its stdin: end it at once."""
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)
        self._proc.stdin.close()
        self._proc.stdout.close()
