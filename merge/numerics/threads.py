"""How many CPU threads torch uses: a node's merges, and the small models of evaluation,
packs and distillation."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

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


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_allocator_arenas(arenas: int | None = None) -> bool:
    """Cap glibc's malloc arenas at the threads a merge uses (default: torch's thread
    count). glibc gives every thread that allocates under contention an arena of its own,
    up to 8 per core, and memory freed in one stays there: a merge's threads each hold
    tensors' worth of it. Capped at 2 on 2 cores, a 307M-parameter merge peaked 60 MB
    lower at the same speed, and the test merge of a large embedding grew 4.5-5.3x its
    largest tensor instead of 6.3-7.6x (tests/test_scale_rules.py). False where there is
    no glibc."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, max(1, arenas or torch.get_num_threads())))


@cache
def _mallopt():
    """glibc's mallopt from the symbols already loaded in this process (no library search,
    which runs ldconfig), or None."""
    if os.name != "posix":
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None

