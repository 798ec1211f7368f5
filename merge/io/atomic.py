"""Write a directory, or a file, completely or not at all."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hivemerge.protocol.errors import UserInputError


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success it replaces ``target``.

    On any exception the staging folder is removed and ``target`` is left as it was,
    so a reader never finds a half-written model where a complete one is expected.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserInputError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserInputError(f"{target}: directory exists and is not empty (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if target.is_dir():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(source: str | Path, target: str | Path) -> bool:
    """Give ``target`` the bytes of ``source``: a hard link where the file system allows
    (no second copy on disk, none to write), else a copy, synced. True if linked.

    A link shares the file: rewriting one in place rewrites the other. Content ids catch
    it (a manifest is looked at again on every use: merge/io/manifest.py)."""
    Path(target).unlink(missing_ok=True)  # a leftover of an earlier try: a copy would write through it
    try:
        os.link(source, target)
        return True
    except OSError:  # another file system, or links not supported
        shutil.copyfile(source, target)
        fsync_path(target)
        return False


def write_file_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the former file or the new one,
    never an empty or torn one: the data reaches the disk before the rename does (a
    rename alone can be persisted ahead of the data it names)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
