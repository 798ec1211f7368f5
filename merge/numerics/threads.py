"""How many CPU threads torch uses: a node's merges, and the small models of evaluation,
packs and distillation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and
    ``taskset`` narrow; torch's default counts every core of the machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_threads(threads: int | None) -> int:
    """Size torch's CPU thread pool (None: :func:`usable_cores`); returns the size. The
    bytes of a merge do not depend on it (numerics/exact.py)."""
    threads = threads or usable_cores()
    torch.set_num_threads(threads)
    return threads


@contextmanager
def single_thread() -> Iterator[None]:
    """Tiny models gain nothing from more threads, and on a busy machine extra threads
    make them many times slower (oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
