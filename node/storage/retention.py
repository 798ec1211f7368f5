"""What a node's content store must keep, and removing the rest.

The store only grows: every round leaves a merged model, every fetch a copy, every
fusion a delta. Pruning removes what nothing on this node still needs. Kept are:

- what the node publishes (its experts' deltas and bases, its logit packs and their
  probe sets, the bases of fusion rounds it proposes): it keeps announcing them;
- everything that a round, search or fusion that has not ended mentions, since it may
  still read it. A round ends when it failed, or when this node attested and then
  learned whether the round became final with its result (``final`` in its state,
  node/coordinators/merge_rounds.py) or fetched its final result; a search ends done or failed;
- per base, the ``keep`` newest consensus results (final rounds this node attested, and
  final results it fetched), and that base: ``fetch`` serves the newest consensus from
  the nodes that hold it.

Only the node's own files decide; nothing from the network does. Interrupted downloads
(``store/partial``) are not pruned here: the fetcher keeps them for a resumed fetch
within the store quota and evicts the oldest first (``ContentStore.make_room``). A running node may be
fetching what no state names yet, so ``hivemerge store prune`` refuses to run beside
one; the node itself prunes (``--keep-results``) only when :func:`live_work` finds
nothing under way and no command that adds content holds its lock (node/coordinators/merge_rounds.py).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from hivemerge.node.storage.home import (
    CONSENSUS_FILE,
    FUSIONS_DIR,
    PACKS_FILE,
    PUBLISHED_FILE,
    ROUNDS_DIR,
    SEARCHES_DIR,
    WATCH_FILE,
    Phase,
    write_json,
)
from hivemerge.node.storage.store import DELTA_SUFFIX, FILE_SUFFIXES, PACK_SUFFIX, PROBE_SUFFIX, ContentStore
from hivemerge.protocol.content import short_id
from hivemerge.protocol.errors import UserInputError

_ID = re.compile(r"[0-9a-f]{64}")
_KIND_OF_SUFFIX = {DELTA_SUFFIX: "delta", PACK_SUFFIX: "pack", PROBE_SUFFIX: "probe"}
ENDED_SEARCH = (Phase.DONE, Phase.FAILED)
UNREADABLE = "unreadable"  # the phase given to a damaged state file: its ids are kept, no work runs on it


@dataclass
class StoredItem:
    cid: str
    kind: str  # model, delta, pack or probe
    content: Path  # the file, or the model's directory
    size: int  # bytes on disk, bundles included
    bundles: list[Path] = field(default_factory=list)  # its bundle manifests
    reasons: list[str] = field(default_factory=list)  # empty: nothing needs it

    @property
    def kept(self) -> bool:
        return bool(self.reasons)


def record_fetched_consensus(home: Path, base_id: str, result_id: str, round_id: str, deadline: float) -> None:
    """Remember a fetched consensus result, so that pruning keeps the newest ones."""
    path = Path(home) / CONSENSUS_FILE
    entries = [e for e in _read_list(path) if e.get("result_id") != result_id]
    entries.append({"base_id": base_id, "result_id": result_id, "round_id": round_id, "deadline": deadline})
    write_json(path, entries)


def inventory(home: Path, keep: int = 1) -> list[StoredItem]:
    """Every object in the store, with the reasons it is kept (none: it may be removed)."""
    if keep < 0:
        raise ValueError("keep must be >= 0")
    home = Path(home)
    if not home.is_dir():
        raise UserInputError(f"{home}: no such node home")
    store = ContentStore(home)
    items = _stored(store)
    for cid, reason in _needed(home, keep):
        if cid in items and reason not in items[cid].reasons:
            items[cid].reasons.append(reason)
    return sorted(items.values(), key=lambda i: (i.kept, i.kind, i.cid))


def prune(home: Path, keep: int = 1, dry_run: bool = False) -> list[StoredItem]:
    """Remove every stored object that nothing keeps; returns those (removed unless ``dry_run``).

    Each object goes as a whole: its bundle manifests first, so no provider record is
    announced for content that is half gone, then the content."""
    removable = [i for i in inventory(home, keep) if not i.kept]
    if not dry_run:
        for item in removable:
            for bundle in item.bundles:
                bundle.unlink(missing_ok=True)
            if item.content.is_dir():
                shutil.rmtree(item.content)
            else:
                item.content.unlink(missing_ok=True)
    return removable


# -- what is stored ---------------------------------------------------------------------
def _stored(store: ContentStore) -> dict[str, StoredItem]:
    items: dict[str, StoredItem] = {}
    if store.objects.is_dir():
        for path in store.objects.iterdir():
            suffix = next((s for s in FILE_SUFFIXES if path.name.endswith(s)), None)
            cid = path.name[: -len(suffix)] if suffix else ""
            if suffix and _ID.fullmatch(cid):  # skips ".<name>.partial-<pid>" staging files
                items[cid] = StoredItem(cid, _KIND_OF_SUFFIX[suffix], path, path.stat().st_size)
    if store.models.is_dir():
        for path in store.models.iterdir():
            if path.is_dir() and _ID.fullmatch(path.name):
                size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
                items[path.name] = StoredItem(path.name, "model", path, size)
    for bundle_id in store.bundle_ids():
        path = store.bundles / f"{bundle_id}.json"
        try:  # read raw, not through store.bundle(): one malformed manifest must not stop the listing
            content = json.loads(path.read_text()).get("content")
        except (OSError, ValueError):
            continue
        if content in items:
            items[content].bundles.append(path)
            items[content].size += path.stat().st_size
    return items


# -- what is needed ---------------------------------------------------------------------
def _needed(home: Path, keep: int):
    """(content id, reason) for everything the node's own files say it needs."""
    for entry in _read_list(home / PUBLISHED_FILE):
        yield from ((cid, f"published ({entry.get('domain', '?')})") for cid in _mentioned(entry))
    for entry in _read_list(home / PACKS_FILE):
        yield from ((cid, f"published pack ({entry.get('domain', '?')})") for cid in _mentioned(entry))
    for cid in _mentioned(_read_list(home / WATCH_FILE, of=str)):
        yield cid, "base of fusion rounds this node proposes"

    rounds = _states(home / ROUNDS_DIR)
    fetched = _read_list(home / CONSENSUS_FILE)
    ended = _ended_rounds(rounds, fetched)
    for label, phase, state in _unended(home, rounds, ended):
        shown = "attested, not yet known final" if phase == Phase.ATTESTED else phase
        yield from ((cid, f"{label} ({shown})") for cid in _mentioned(state))
    yield from _needed_by_fusions(home / FUSIONS_DIR, ended)
    yield from _newest_consensus(rounds, fetched, keep)


def live_work(home: Path) -> str | None:
    """What is under way on this node (a round or search that has not ended, a fusion
    being distilled), or None: pruning in a running node waits for None."""
    home = Path(home)
    rounds = _states(home / ROUNDS_DIR)
    # A damaged state file is skipped by the coordinators (node/storage/home.py): no work
    # runs on it, so it must not hold pruning off forever; what it mentions is kept anyway.
    unended = next((u for u in _unended(home, rounds, _ended_rounds(rounds, _read_list(home / CONSENSUS_FILE)))
                    if u[1] != UNREADABLE), None)
    if unended is not None:
        label, phase, _ = unended
        return f"{label} is {phase}"
    for name, state in _states(home / FUSIONS_DIR).items():
        if state.get("phase") == Phase.FUSING:
            return f"fusion {name[:18]} is distilling"
    return None


def _unended(home: Path, rounds: dict[str, dict], ended: set[str]):
    """(label, phase, state) of every round and search that has not ended."""
    for rid, state in rounds.items():
        if rid not in ended:
            yield f"round {short_id(rid)}", state.get("phase"), state
    for rid, state in _states(home / SEARCHES_DIR).items():
        if state.get("phase") not in ENDED_SEARCH:
            yield f"search {short_id(rid)}", state.get("phase"), state


def _ended_rounds(rounds: dict[str, dict], fetched: list[dict]) -> set[str]:
    final = {e.get("round_id") for e in fetched}  # the rounds whose consensus this node fetched: final by construction
    return {rid for rid, s in rounds.items() if _round_ended(s) or (s.get("phase") == Phase.ATTESTED and rid in final)}


def _round_ended(state: dict) -> bool:
    return state.get("phase") in (Phase.FAILED, Phase.LISTED) or (state.get("phase") == Phase.ATTESTED and "final" in state)


def _needed_by_fusions(folder: Path, ended_rounds: set[str]):
    states = _states(folder)
    # A fused delta adopted by a round that ended is that round's; its "ahead" copy is not needed.
    spent = {s.get("delta_id") for rid, s in states.items() if rid in ended_rounds or s.get("phase") == Phase.FAILED}
    for name, state in states.items():
        if name.startswith("ahead-"):  # distilled before proposing, for a round not proposed yet
            if state.get("delta_id") not in spent:
                yield from ((cid, "fusion distilled before proposing") for cid in _mentioned(state))
        elif name not in ended_rounds and state.get("phase") != Phase.FAILED:
            yield from ((cid, f"fusion of round {short_id(name)} ({state.get('phase')})") for cid in _mentioned(state))


def _newest_consensus(rounds: dict[str, dict], fetched: list[dict], keep: int):
    results: dict[str, dict[str, tuple[float, str]]] = {}  # base -> result -> (deadline, round)
    for rid, state in rounds.items():
        if state.get("phase") == Phase.ATTESTED and state.get("final") is True:
            proposal = state["proposal"]
            results.setdefault(proposal["base_id"], {})[state["result_id"]] = (proposal["deadline"], rid)
    for entry in fetched:
        if {"base_id", "result_id", "deadline", "round_id"} <= entry.keys():
            results.setdefault(entry["base_id"], {})[entry["result_id"]] = (entry["deadline"], entry["round_id"])
    for base_id, by_result in results.items():
        newest = sorted(by_result.items(), key=lambda kv: (-kv[1][0], kv[1][1]))[:keep]
        for result_id, (_, rid) in newest:
            yield result_id, f"consensus of round {short_id(rid)} (newest {keep} for base {short_id(base_id)})"
        if newest:
            yield base_id, f"base of a kept consensus ({short_id(base_id)})"


def _mentioned(value) -> set[str]:
    """Every content id that appears in a JSON value (bare, or inside hm:// references),
    keys included: states map delta ids to domains."""
    if isinstance(value, str):
        return set(_ID.findall(value))
    if isinstance(value, dict):
        return set().union(*(_mentioned(k) | _mentioned(v) for k, v in value.items())) if value else set()
    if isinstance(value, list):
        return set().union(*(_mentioned(v) for v in value)) if value else set()
    return set()


def _states(folder: Path) -> dict[str, dict]:
    """The JSON state files of a folder by name. One that is not JSON keeps every id in its
    text (its phase is unknown, so it has not ended), as JsonStates logs and skips it."""
    states = {}
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            text = _read(path)
            try:
                value = json.loads(text)
            except ValueError:
                value = None
            states[path.stem] = value if isinstance(value, dict) else {"phase": UNREADABLE, "text": text}
    return states


def _read_list(path: Path, of: type = dict) -> list:
    if not path.is_file():
        return []
    try:
        value = json.loads(_read(path))
    except ValueError:
        raise UserInputError(f"{path}: not valid JSON; pruning cannot tell what it needs (repair or remove it)") from None
    return [e for e in value if isinstance(e, of)] if isinstance(value, list) else []


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        raise UserInputError(f"{path}: cannot be read ({exc.strerror}); pruning cannot tell what it needs") from None
