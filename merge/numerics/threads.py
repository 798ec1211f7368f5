"""How many CPU threads the work uses: a merge's passes over a tensor, split in spans
across the merge's workers (:func:`in_parallel`), torch's own pool for the rest, and the
small models of evaluation, packs and distillation (one thread)."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import TypeVar

import torch

from hivemerge.merge.numerics import placement

T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and
    ``taskset`` narrow; torch's default counts every core of the machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_width: int | None = None  # the workers use_threads set; None: torch's thread count
_local = threading.local()  # .inside: this thread is one of the workers; .single: in single_thread()


def use_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads (None: :func:`usable_cores`): the merge's workers and
    torch's pool; returns the number. The bytes of a merge do not depend on it
    (numerics/exact.py)."""
    global _width
    _width = threads = threads or usable_cores()
    torch.set_num_threads(threads)
    return threads


def workers() -> int:
    """How many threads :func:`in_parallel` runs work on (one inside :func:`single_thread`)."""
    if getattr(_local, "single", False):
        return 1
    return _width if _width is not None else torch.get_num_threads()


@contextmanager
def single_thread() -> Iterator[None]:
    """Tiny models gain nothing from more threads, and on a busy machine extra threads
    make them many times slower (oversubscription)."""
    threads, single = torch.get_num_threads(), getattr(_local, "single", False)
    torch.set_num_threads(1)
    _local.single = True
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _local.single = single


def parts_on(device: torch.device) -> int:
    """How many runs a pass over a tensor on ``device`` splits into: the workers on the
    CPU; one elsewhere (a GPU's spans are whole kernels already)."""
    return workers() if placement.cpu_ways(device) else 1


def split(count: int, parts: int) -> list[range]:
    """``range(count)`` in at most ``parts`` contiguous ranges of near-equal length (none empty)."""
    parts = max(1, min(parts, count))
    return [range(count * i // parts, count * (i + 1) // parts) for i in range(parts)]


_pools: dict[int, ThreadPoolExecutor | None] = {}  # by size; never replaced (another thread may be using one)
_lock = threading.Lock()


def in_parallel(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(item) for item in items]``, the items run side by side on the workers while
    the caller waits. Serial, in the caller, with one worker or one item, inside a
    worker (one that waited on its own pool could stall it), and where the workers could
    not be started.

    Each worker runs torch at one thread: the items are the parallelism, and each
    worker's ops fanning out to every core again would oversubscribe them (a
    307M-parameter merge spent a quarter more CPU that way). The caller keeps its own
    thread count (torch's count is per thread) for the work it does itself."""
    width = workers()
    pool = _pool(width) if width > 1 and len(items) > 1 and not getattr(_local, "inside", False) else None
    if pool is None:
        return [fn(item) for item in items]
    futures = [pool.submit(fn, item) for item in items]
    errors = [f.exception() for f in futures]  # every item is done before anything returns
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]


def each(fn: Callable[[T], R], items: Sequence[T], parts: int | None = None) -> list[R]:
    """``[fn(item) for item in items]``, the items split in contiguous runs among the
    workers (at most ``parts`` runs; default one per worker), results in item order."""
    runs = in_parallel(lambda run: [fn(items[i]) for i in run], split(len(items), parts or workers()))
    return [result for run in runs for result in run]


def _pool(size: int) -> ThreadPoolExecutor | None:
    with _lock:
        if size not in _pools:
            _pools[size] = _start_workers(size)
        return _pools[size]


def _start_workers(size: int) -> ThreadPoolExecutor | None:
    """``size`` threads, each set to run torch at one thread, or None where they could
    not all start (the work then runs in the caller: a failure here is this machine's,
    never to be blamed on the data being worked on). torch.set_num_threads sets the
    calling thread's OpenMP count but also process-wide ones (MKL's, and the count
    threads take when they first run torch), so the caller's are set again once every
    worker has started."""
    own = torch.get_num_threads()
    started = threading.Barrier(size + 1)

    def start() -> None:
        _local.inside = True
        torch.get_num_threads()  # torch sets a thread's count from the process-wide one when first asked, not after
        torch.set_num_threads(1)
        started.wait(60)

    executor = ThreadPoolExecutor(size, thread_name_prefix="hivemerge-worker", initializer=start)
    try:
        for _ in range(size):
            executor.submit(int)  # each submission starts a thread while fewer than size run
        started.wait(60)
    except (RuntimeError, threading.BrokenBarrierError):  # a thread that could not start, or did not in time
        started.abort()
        executor.shutdown(wait=False)
        return None
    finally:
        torch.set_num_threads(own)
    return executor


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_allocator_arenas(arenas: int | None = None) -> bool:
    """Cap glibc's malloc arenas at the threads a merge uses (default: the merge's
    workers). glibc gives every thread that allocates under contention an arena of its own,
    up to 8 per core, and memory freed in one stays there: a merge's threads each hold
    tensors' worth of it. Capped at 2 on 2 cores, a 307M-parameter merge peaked 60 MB
    lower at the same speed, and the test merge of a large embedding grew 4.5-5.3x its
    largest tensor instead of 6.3-7.6x (tests/test_scale_rules.py). False where there is
    no glibc."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, max(1, arenas or workers())))


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

