"""The DHT storage a node keeps for others: bounded, and newest record first.

hivemind's local storage keeps whatever valid records it is sent, for as long as their
expiry says, and lets a later expiry win. Both are unsafe with strangers: one key could
hold records until lookups exceed p2pd's reply cap (and the key is unreadable for
everyone), and a relayed copy of an owner's old record could override its newer one.
:class:`BoundedRecordStorage` replaces the storage and cache of a ``DHTNode``:

- at most ``MAX_KEY_BYTES`` under one key (shared fairly: see :meth:`_fair_share`),
  ``MAX_RECORDS_PER_OWNER_KEY`` records with a content-id qualifier per owner and key
  (experts, packs, proposals),
  ``MAX_RECORDS_PER_OWNER`` records per owner in all, ``MAX_STORED_RECORDS`` in all,
  a record larger than ``MAX_RECORD_BYTES`` (a charter) counting as one per started
  ``MAX_RECORD_BYTES``, so the caps bound memory as well as counts;
  a refresh of a record already stored always fits;
- per subkey, the record with the later signed ``issued_at`` wins, whatever the expiries
  say (equal: the later expiry, as before); values without subkeys are refused (no
  hivemerge record has none).

The validator (node/net/network.py) has already checked every record's signature and schema
by the time it gets here, so reading ``issued_at`` needs no further checks; a value that
does not parse is refused all the same.
"""

from __future__ import annotations

import json
from typing import Any

from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.utils import MSGPackSerializer

from hivemerge.protocol import bounds
from hivemerge.protocol.content import is_content_id


def issued_at(value: bytes) -> float | None:
    """The signed ``issued_at`` of a stored record value (None if it does not parse)."""
    try:
        stamp = json.loads(MSGPackSerializer.loads(value))["manifest"]["issued_at"]
    except Exception:
        return None
    return float(stamp) if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) else None


def _cost(subkey: str, value: bytes) -> int:
    """What a record adds to a lookup reply: its value, its subkey and msgpack's framing."""
    return len(value) + len(subkey) + 16


def _slots(value: bytes) -> int:
    """How many records ``value`` counts as: one per started MAX_RECORD_BYTES."""
    return max(1, -(-len(value) // bounds.MAX_RECORD_BYTES))


def owner_of(subkey: Any) -> str | None:
    return subkey.split("/", 1)[0] if isinstance(subkey, str) else None


def _counted_per_owner_and_key(subkey: str) -> bool:
    """Subkeys ``<owner>/<content id>``: an owner chooses how many (experts, packs,
    proposals); the others (commit, attest, fusion, per-generation records) have a
    namespace the record schemas bound."""
    return is_content_id(subkey.split("/", 1)[-1])


class BoundedRecordStorage(DHTLocalStorage):
    def __init__(self, maxsize: int | None = None):
        super().__init__(maxsize=maxsize)
        # (key, subkey) pairs stored, by owner; pruned of expired entries when a cap is reached
        self._by_owner: dict[str, set[tuple[DHTID, str]]] = {}
        self._slots: dict[tuple[DHTID, str], int] = {}  # how many records each stored one counts as
        self.refused = 0  # stores refused by a cap or the newest-wins rule (for logs and tests)
        self.evicted = 0  # records given up for a fair share of a full key

    def store(self, key: DHTID, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        if subkey is None:
            self.refused += 1
            return False
        return self.store_subkey(key, subkey, value, expiration_time)

    def store_subkey(self, key: DHTID, subkey: Any, value: Any, expiration_time: float) -> bool:
        owner = owner_of(subkey)
        stamp = issued_at(value) if isinstance(value, bytes) else None
        if owner is None or stamp is None:
            self.refused += 1
            return False
        current = self.get(key)
        dictionary = current.value if current is not None and isinstance(current.value, DictionaryDHTValue) else None
        existing = dictionary.get(subkey) if dictionary is not None else None
        if existing is not None:
            previous = issued_at(existing.value)
            if previous is not None and stamp < previous:
                self.refused += 1
                return False  # an older record of the owner's never replaces a newer one
            if previous is not None and stamp > previous:
                del dictionary[subkey]  # the newer record wins even with an earlier expiry
        elif not self._has_room(key, dictionary, owner, subkey, _cost(subkey, value), _slots(value)):
            self.refused += 1
            return False
        stored = super().store_subkey(key, subkey, value, expiration_time)
        if stored:
            self._by_owner.setdefault(owner, set()).add((key, subkey))
            self._slots[(key, subkey)] = max(self._slots.get((key, subkey), 1), _slots(value))
        return stored

    # -- caps ---------------------------------------------------------------------------
    def _weight(self, entries) -> int:
        return sum(self._slots.get(entry, 1) for entry in entries)

    def _has_room(self, key: DHTID, dictionary: DictionaryDHTValue | None, owner: str, subkey: str, cost: int,
                  slots: int = 1) -> bool:
        """Whether a new record of ``owner``'s fits every cap; the key's fair share comes
        last, since making room there evicts (a store refused by another cap evicts nothing)."""
        if _counted_per_owner_and_key(subkey) and dictionary is not None:
            mine = sum(1 for s, _ in dictionary.items() if owner_of(s) == owner and _counted_per_owner_and_key(s))
            if mine >= bounds.MAX_RECORDS_PER_OWNER_KEY:
                return False
        owned = self._weight(self._by_owner.get(owner, set()))
        if owned + slots > bounds.MAX_RECORDS_PER_OWNER and self._prune(owner) + slots > bounds.MAX_RECORDS_PER_OWNER:
            return False
        total = sum(self._weight(s) for s in self._by_owner.values())
        if total + slots > bounds.MAX_STORED_RECORDS and self._prune_all() + slots > bounds.MAX_STORED_RECORDS:
            return False
        return dictionary is None or self._fair_share(key, dictionary, owner, cost)

    def _fair_share(self, key: DHTID, dictionary: DictionaryDHTValue, owner: str, cost: int) -> bool:
        """Room under one key for ``cost`` more bytes of ``owner``'s: while the key is full,
        the owner holding the most bytes there gives up its record that expires first, as
        long as it would still hold more than ``owner`` then does. A key full of one
        stranger's records thus still takes everyone else's; one full of many owners'
        single records takes no more (who may write is the charter's business)."""
        held: dict[str, list[tuple[float, str, int]]] = {}
        for s, item in dictionary.items():
            held.setdefault(owner_of(s), []).append((item.expiration_time, s, _cost(s, item.value)))
        total = sum(c for entries in held.values() for *_, c in entries)
        mine = sum(c for *_, c in held.get(owner, []))
        while total + cost > bounds.MAX_KEY_BYTES:
            others = [o for o in held if o != owner and held[o]]
            if not others:
                return False
            largest = max(others, key=lambda o: (sum(c for *_, c in held[o]), o))
            theirs = sum(c for *_, c in held[largest])
            if theirs - min(held[largest])[2] < mine + cost:
                return False
            _, victim, freed = held[largest].pop(held[largest].index(min(held[largest])))
            del dictionary[victim]
            self._by_owner.get(largest, set()).discard((key, victim))
            self._slots.pop((key, victim), None)
            self.evicted += 1
            total -= freed
        return True

    def _live(self, key: DHTID, subkey: str) -> bool:
        current = self.get(key)
        return current is not None and isinstance(current.value, DictionaryDHTValue) and current.value.get(subkey) is not None

    def _prune(self, owner: str) -> int:
        """Forget the owner's entries that expired or were replaced; returns what is left (in records)."""
        entries = self._by_owner.get(owner, set())
        live = {entry for entry in entries if self._live(*entry)}
        for gone in entries - live:
            self._slots.pop(gone, None)
        if live:
            self._by_owner[owner] = live
        else:
            self._by_owner.pop(owner, None)
        return self._weight(live)

    def _prune_all(self) -> int:
        return sum(self._prune(owner) for owner in list(self._by_owner))
