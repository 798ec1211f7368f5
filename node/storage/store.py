"""The node's local content store: verified objects under ``HOME/store``, by content id.

Deltas, logit packs and probe sets are files (``store/objects/<id>.delta.safetensors``,
``<id>.pack.safetensors``, ``<id>.probe.jsonl``), models are directories
(``store/models/<id>/``). Every object has a bundle manifest (its files cut into
hashed chunks, :mod:`hivemerge.protocol.bundles`) under ``store/bundles/<bundle id>.json``
so the node can serve it chunk by chunk. Objects enter only after their id is
checked, so what the store returns under an id is what that id names, and a stored
model holds exactly the files its id covers (:func:`hivemerge.merge.io.manifest.model_files`).
Files enter with their data on disk before their name (fsync, then rename): after a
crash an object is whole or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

from hivemerge.merge.deltas.delta import DeltaFile
from hivemerge.merge.fusion.packs import PackFile
from hivemerge.merge.fusion.probe import load_probe, probe_bytes
from hivemerge.merge.io.atomic import fsync_path, link_or_copy, write_file_atomic
from hivemerge.merge.io.manifest import files_key, model_files, model_id
from hivemerge.merge.io.sources import SafetensorsModel, read_exactly
from hivemerge.merge.numerics import threads
from hivemerge.protocol.bundles import (  # noqa: F401  (the suffixes are declared in protocol; imported from here too)
    DEFAULT_CHUNK_SIZE,
    DELTA_SUFFIX,
    FILE_SUFFIXES,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    PACK_SUFFIX,
    PROBE_SUFFIX,
    bundle_manifest,
    check_bundle,
    chunk_count,
    chunk_span,
)
from hivemerge.protocol.content import canonical_json, content_id, is_content_id
from hivemerge.protocol.errors import UserInputError

# What peers can make this node store is bounded by its quota (``node start --max-store``).
# 200 GiB holds a few consensus models of 7-13B parameters in 16 bits beside the deltas a
# round fetches; a node that merges bigger models says so. Whatever the quota, a fetch never
# leaves less than MIN_FREE_DISK free on the disk (the quota may be larger than the disk).
DEFAULT_MAX_STORE = 200 << 30
MIN_FREE_DISK = 1 << 30
_BUNDLES_REMEMBERED = 256  # bundle ids a store remembers by its files' stat (write_bundle)


def verify_file_object(path: Path, suffix: str) -> str:
    """Check a one-file object completely; returns its content id (raises UserInputError)."""
    if suffix == DELTA_SUFFIX:
        delta = DeltaFile(path)
        delta.verify_all()
        return delta.id
    if suffix == PACK_SUFFIX:
        pack = PackFile(path)  # refuses a pack over MAX_PACK_BYTES before reading it
        pack.verify()  # as a stream: every hash, and every token id has its text
        return pack.id

    probe = load_probe(path)
    if path.read_bytes() != probe_bytes(probe.pairs):
        raise UserInputError(f"{path}: probe file is not in canonical form")
    return probe.id


def _chunk_hashes(path: Path, chunk_size: int) -> list[str]:
    """The sha256 of each chunk of a file (one, of nothing, for an empty file), the
    chunks read and hashed side by side by the merge's workers: a consensus is gigabytes."""
    size = path.stat().st_size
    with path.open("rb") as f:

        def chunk(start: int) -> str:
            data = bytearray(min(chunk_size, size - start))
            read_exactly(f.fileno(), memoryview(data), start, f"{path}: shrank while it was hashed")
            return hashlib.sha256(data).hexdigest()

        return threads.in_parallel(chunk, range(0, max(size, 1), chunk_size))


class StoreFullError(UserInputError):
    """Storing something would take the store over its quota or the disk below its floor."""


def unwritten_bytes(path: Path) -> int:
    """Bytes the sparse files under ``path`` will still take on disk (their size past their blocks)."""
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += max(0, st.st_size - st.st_blocks * 512)
    return total


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` as their sizes say (a fetch's staging files are
    created at their full size, so what a fetch will write is counted from its start)."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += tree_bytes(Path(entry.path))
            else:
                total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue  # removed meanwhile
    return total


class ContentStore:
    def __init__(self, home: Path, chunk_size: int = DEFAULT_CHUNK_SIZE, max_bytes: int = DEFAULT_MAX_STORE):
        self.root = Path(home) / "store"
        self.objects = self.root / "objects"
        self.models = self.root / "models"
        self.bundles = self.root / "bundles"
        self.partial = self.root / "partial"
        self.chunk_size = chunk_size
        self.max_bytes = max_bytes
        # Bundles this process wrote, by the files they cover (manifest.files_key) and the chunk
        # size: publishing a second expert of the same base does not hash the base's chunks again.
        self._bundles_of_files: OrderedDict[tuple, str] = OrderedDict()
        self._remembering = threading.Lock()

    # -- quota ------------------------------------------------------------------------
    def used_bytes(self) -> int:
        """Everything under the store: objects, models, bundles and staging (store/partial)."""
        return tree_bytes(self.root)

    def fetch_staging(self, bundle_id: str) -> Path:
        """Where a fetch of ``bundle_id`` keeps its verified chunks until the object is whole."""
        return self.partial / bundle_id

    def resumable(self) -> list[Path]:
        """Staging folders of fetches that failed and may resume, oldest first."""
        if not self.partial.is_dir():
            return []
        found = [p for p in self.partial.iterdir() if p.is_dir() and is_content_id(p.name)]
        return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))

    def make_room(self, need: int, keep: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """Make ``need`` more bytes fit the quota, or raise StoreFullError with nothing removed.
        Staging kept for resuming is only kept within the quota: the oldest goes first (never
        the bundles in ``keep``, fetches under way). Returns the bundle ids of staging removed."""
        used = self.used_bytes()
        evictable = [(p, tree_bytes(p)) for p in self.resumable() if p.name not in keep]
        if used + need > self.max_bytes:
            if used - sum(size for _, size in evictable) + need > self.max_bytes:
                raise StoreFullError(
                    f"storing {need} more bytes would take the store to {used + need} bytes, over its quota of "
                    f"{self.max_bytes} (node start --max-store; hivemerge store prune removes what nothing needs)")
        removed = []
        for path, size in evictable:
            if used + need <= self.max_bytes:
                break
            shutil.rmtree(path, ignore_errors=True)
            used -= size
            removed.append(path.name)
        self.partial.mkdir(parents=True, exist_ok=True)
        # Staging files are sparse until their chunks arrive: what they will still take counts
        # as used already, or fetches side by side would each pass this check and fill the disk.
        free = shutil.disk_usage(self.partial).free - unwritten_bytes(self.partial)
        if free - need < MIN_FREE_DISK:
            raise StoreFullError(f"storing {need} more bytes would leave {max(free - need, 0)} bytes free on the disk "
                                 f"of {self.root}, less than {MIN_FREE_DISK}")
        return removed

    # -- lookup -----------------------------------------------------------------------
    def resolve(self, cid: str) -> Path:
        for path in (*(self.objects / f"{cid}{s}" for s in FILE_SUFFIXES), self.models / cid):
            if path.exists():
                return path
        raise UserInputError(f"hm://{cid}: not in the content store at {self.root}")

    def has(self, cid: str) -> bool:
        return self._file_of(cid) is not None or (self.models / cid).is_dir()

    def _file_of(self, cid: str) -> Path | None:
        return next((p for s in FILE_SUFFIXES if (p := self.objects / f"{cid}{s}").exists()), None)

    def content_root(self, cid: str) -> Path:
        """The folder that a bundle's relative file paths are relative to."""
        return self.objects if self._file_of(cid) is not None else self.models / cid

    def model(self, cid: str):
        path = self.models / cid
        if not path.is_dir():
            raise UserInputError(f"hm://{cid}: model not in the content store at {self.root}")
        return SafetensorsModel(path)

    def bundle(self, bundle_id: str) -> dict | None:
        if not is_content_id(bundle_id):  # it names a file: an id, never a path
            return None
        path = self.bundles / f"{bundle_id}.json"
        if not path.is_file():
            return None
        return check_bundle(json.loads(path.read_text()), bundle_id)

    def bundle_ids(self) -> list[str]:
        return sorted(p.stem for p in self.bundles.glob("*.json")) if self.bundles.is_dir() else []

    def read_chunk(self, bundle: dict, file_index: int, chunk_index: int) -> bytes:
        entry = bundle["files"][file_index]
        begin, end = chunk_span(entry["size"], bundle["chunk_size"], chunk_index)
        with (self.content_root(bundle["content"]) / entry["path"]).open("rb") as f:
            f.seek(begin)
            return f.read(end - begin)

    # -- adding -----------------------------------------------------------------------
    def add_delta(self, path: Path) -> str:
        """Verify a delta file completely and copy it in; returns its id."""
        return self._add_file(path, DELTA_SUFFIX)

    def add_pack(self, path: Path) -> str:
        """Verify a logit pack completely (signature, every hash) and copy it in; returns its id."""
        return self._add_file(path, PACK_SUFFIX)

    def add_probe(self, path: Path) -> str:
        """Store a probe set (JSONL) in canonical form under its probe id; returns the id."""
        probe = load_probe(path)
        self.partial.mkdir(parents=True, exist_ok=True)
        scratch = self.partial / f"probe-{os.getpid()}{PROBE_SUFFIX}"
        try:
            scratch.write_bytes(probe_bytes(probe.pairs))
            return self._add_file(scratch, PROBE_SUFFIX)
        finally:
            scratch.unlink(missing_ok=True)

    def _add_file(self, path: Path, suffix: str) -> str:
        cid = verify_file_object(Path(path), suffix)
        self.objects.mkdir(parents=True, exist_ok=True)
        target = self.objects / f"{cid}{suffix}"
        if not target.exists():
            staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
            try:
                link_or_copy(path, staging)  # the caller's scratch file, usually: then no copy at all
                os.replace(staging, target)
                fsync_path(self.objects)
            finally:
                staging.unlink(missing_ok=True)  # after a failed copy: no half file left behind
        self.write_bundle(cid)
        return cid

    def add_model(self, directory: Path) -> str:
        """Take a model directory in under its content id (its weights and side files):
        hard links where the file system allows, so a published base is not stored twice."""
        directory = Path(directory)
        model = SafetensorsModel(directory)
        cid = model_id(model)
        target = self.models / cid
        if not target.is_dir():
            self.models.mkdir(parents=True, exist_ok=True)
            staging = self.models / f".{cid}.partial-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            try:
                # The files the model's id covers (a model card is written on export).
                for name in model_files(model):
                    link_or_copy(directory / name, staging / name)
                os.replace(staging, target)
                fsync_path(self.models)
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # after a failed copy: no half model left behind
        self.write_bundle(cid)
        return cid

    def write_bundle(self, cid: str) -> str:
        """(Re)compute the bundle manifest of a stored object; returns the bundle id."""
        root = self.content_root(cid)
        if root == self.objects:
            paths = [self._file_of(cid).name]
        else:  # what the id covers, nothing else that may lie in the folder
            paths = model_files(SafetensorsModel(root))
        files_now = files_key(root, paths)
        key = (cid, self.chunk_size, files_now)
        known = self._bundles_of_files.get(key)
        if known is not None and (self.bundles / f"{known}.json").exists():
            return known
        sizes = {name: size for name, _, _, size, _ in files_now}
        chunk_size = self.chunk_size
        # Bigger chunks for a big object: peers refuse manifests of more than MAX_CHUNKS chunks.
        while sum(chunk_count(n, chunk_size) for n in sizes.values()) > MAX_CHUNKS and chunk_size < MAX_CHUNK_SIZE:
            chunk_size = min(2 * chunk_size, MAX_CHUNK_SIZE)
        files = [{"path": p, "size": sizes[p], "chunks": _chunk_hashes(root / p, chunk_size)} for p in paths]
        manifest = bundle_manifest(cid, chunk_size, files)
        bundle_id = content_id(manifest)
        self.bundles.mkdir(parents=True, exist_ok=True)
        target = self.bundles / f"{bundle_id}.json"
        if not target.exists():
            write_file_atomic(target, canonical_json(manifest))
        try:
            unchanged = files_key(root, paths) == files_now  # while it was hashed
        except FileNotFoundError:  # pruned meanwhile: nothing to remember
            unchanged = False
        if unchanged:
            with self._remembering:  # a node writes bundles from several threads
                self._bundles_of_files[key] = bundle_id
                while len(self._bundles_of_files) > _BUNDLES_REMEMBERED:  # the oldest first
                    self._bundles_of_files.popitem(last=False)
        return bundle_id

    def bundle_of(self, cid: str) -> str | None:
        for bundle_id in self.bundle_ids():
            bundle = self.bundle(bundle_id)
            if bundle and bundle["content"] == cid:
                return bundle_id
        return None
