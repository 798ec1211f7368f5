"""How many CPU threads torch uses for the small models of evaluation, packs and distillation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
